"""Configuration derived from the config dataclasses: flags, per-service environment prefixes, precedence."""
import pytest

from audio_service.config import AudioConfig, parse_args as audio_args
from orchestrator.config import OrchestratorConfig, parse_args as orchestrator_args
from serving.config import settings
from vlm_service.config import VlmConfig, parse_args as vlm_args


def test_services_sharing_one_environment_pick_up_their_own_ports(monkeypatch):
    monkeypatch.setenv("I2S_VLM_PORT", "7101")
    monkeypatch.setenv("I2S_AUDIO_PORT", "7102")
    monkeypatch.setenv("I2S_ORCHESTRATOR_PORT", "7100")
    monkeypatch.setenv("I2S_AUDIO_METRICS_PORT", "9102")
    assert vlm_args([]).server.port == 7101
    assert audio_args([]).server.port == 7102
    assert orchestrator_args([]).server.port == 7100
    assert audio_args([]).server.metrics_port == 9102
    assert vlm_args([]).server.metrics_port == -1  # not the audio service's


def test_flag_beats_prefixed_variable_beats_legacy_variable_beats_default(monkeypatch, caplog):
    assert vlm_args([]).max_queue == 16
    monkeypatch.setenv("I2S_MAX_QUEUE", "3")  # the pre-prefix name, still read for one release
    assert vlm_args([]).max_queue == 3
    assert "I2S_MAX_QUEUE is deprecated" in caplog.text
    monkeypatch.setenv("I2S_VLM_MAX_QUEUE", "5")
    assert vlm_args([]).max_queue == 5
    assert vlm_args(["--max-queue", "7"]).max_queue == 7


def test_every_setting_has_a_flag_of_its_type_and_optional_ones_accept_none(monkeypatch):
    config = vlm_args(["--max-pixels", "200704", "--dtype", "bfloat16", "--grace-seconds", "2.5",
                       "--max-message-mb", "8", "--device", "none"])
    assert (config.max_pixels, config.dtype, config.server.grace_seconds, config.device) == (200704, "bfloat16", 2.5, None)
    assert config.server.max_message_bytes == 8 * 1024 * 1024
    orchestrator = orchestrator_args(["--vlm", "dns:///vlm.ns.svc.cluster.local:50051", "--max-audio-calls", "3"])
    assert orchestrator.vlm_target == "dns:///vlm.ns.svc.cluster.local:50051"
    assert orchestrator.limits.max_audio_calls == 3
    audio = audio_args(["--negative-prompt", "speech", "--max-batch-size", "8"])
    assert (audio.default_negative_prompt, audio.max_batch_size) == ("speech", 8)


@pytest.mark.parametrize("cls", [VlmConfig, AudioConfig, OrchestratorConfig])
def test_the_flag_table_is_derived_from_the_fields(cls):
    table = list(settings(cls))
    flags = [s.flag for s in table]
    assert len(flags) == len(set(flags))
    assert {"host", "port", "metrics-port", "grace-seconds"} <= set(flags)
    for s in table:  # every flag's default is the dataclass default, read through its path
        value = cls()
        for name in s.path:
            value = getattr(value, name)
        assert value == s.default


@pytest.mark.parametrize("name,value,complaint", [
    ("I2S_VLM_PORT", "fifty", "I2S_VLM_PORT='fifty'"),
    ("I2S_VLM_DTYPE", "int8", "choose from"),
])
def test_a_bad_environment_value_names_the_variable(monkeypatch, capsys, name, value, complaint):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        vlm_args([])
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_bad_flag_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        audio_args(["--dtype", "int8"])
    with pytest.raises(SystemExit):
        orchestrator_args(["--max-images-in-flight", "many"])
    assert "invalid" in capsys.readouterr().err


def test_comma_list_settings_are_parsed_as_flags(monkeypatch, capsys):
    assert audio_args(["--duration-buckets", "10, 4,30,4"]).duration_buckets == (4.0, 10.0, 30.0)
    assert audio_args(["--duration-buckets", ""]).duration_buckets == ()
    assert vlm_args(["--engine-token-buckets", "4,1"]).engine_token_buckets == (1, 4)
    monkeypatch.setenv("I2S_VLM_ENGINE_TOKEN_BUCKETS", "1,2")
    assert vlm_args([]).engine_token_buckets == (1, 2)
    assert "default: 1,8;" in _help(vlm_args, capsys)


@pytest.mark.parametrize("parse,flag,value,complaint", [
    (audio_args, "--duration-buckets", "4,ten", "not a comma list of floats"),
    (audio_args, "--duration-buckets", "4,-1", "positive"),
    (audio_args, "--duration-buckets", "4,nan", "positive"),
    (vlm_args, "--engine-token-buckets", "1,2.5", "not a comma list of ints"),
    (vlm_args, "--engine-token-buckets", "2,8", "start at 1"),
])
def test_a_bad_comma_list_fails_as_a_flag_error_before_start_up(capsys, parse, flag, value, complaint):
    with pytest.raises(SystemExit) as info:
        parse([flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}" in err and complaint in err


def _help(parse, capsys) -> str:
    with pytest.raises(SystemExit):
        parse(["--help"])
    return capsys.readouterr().out


def test_boolean_settings_take_a_bare_flag_a_value_or_no(monkeypatch):
    assert vlm_args([]).engine is True
    assert vlm_args(["--engine", "false"]).engine is False
    assert vlm_args(["--no-engine"]).engine is False
    assert vlm_args(["--no-engine", "--engine"]).engine is True
    assert vlm_args(["--no-reflection"]).server.reflection is False
    monkeypatch.setenv("I2S_VLM_ENGINE_PREFIX_CACHE", "off")
    assert vlm_args([]).engine_prefix_cache is False


HELP_CASES = [
    ("vlm_service.config", "i2s-vlm", ["network, TLS and tokens:", "engine settings:", "CPU threads:",
                                       "(default: 16; env I2S_VLM_MAX_QUEUE)", "--dtype {bfloat16,float16,float32}"]),
    ("audio_service.config", "i2s-audio", ["triton settings:", "--port PORT", "(default: 64; env I2S_AUDIO_MAX_QUEUE)"]),
    ("orchestrator.config", "i2s-orchestrator", ["downstream settings:", "pipeline limits:", "--vlm VLM"]),
]


@pytest.mark.parametrize("module, script, expected", HELP_CASES, ids=[c[1] for c in HELP_CASES])
def test_help_is_grouped_with_defaults_plain_placeholders_and_the_name_typed(module, script, expected, monkeypatch,
                                                                             capsys):
    import importlib

    monkeypatch.setattr("sys.argv", [f"/venv/bin/{script}", "--help"])
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith(f"usage: {script} [options]")
    for part in expected:
        assert part in text, part
    for jargon in (",None}", " STR ", " INT ", " FLOAT ", "(default: ;", "(default: None"):
        assert jargon not in text, jargon


def test_the_command_lines_help_shows_defaults_in_plain_groups(monkeypatch, capsys):
    from i2s_cli import cli

    monkeypatch.setattr("sys.argv", ["/venv/bin/i2s", "--help"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage: i2s [options]")
    for part in ("input and output:", "sound:", "models and devices", "webp; default: data)", "(default: 4)",
                 "(default: 3.5)", "(default: Qwen/Qwen2.5-VL-7B-Instruct)", "(default: cvssp/audioldm2)", "webp",
                 "--orchestrator HOST:PORT"):
        assert part in text, part
    for jargon in ("the seed's options", "embedded mode", "None", " STR"):
        assert jargon not in text, jargon
