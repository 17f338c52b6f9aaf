"""`make run` without reachable weights stops early with one clear message (no stack trace)."""
import pytest

from i2s_cli import cli
from i2s_cli.preflight import ModelUnavailable, check_model


def test_a_local_folder_needs_a_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="no config.json or model_index.json"):
        check_model(str(tmp_path / "empty"))
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "model_index.json").write_text("{}")
    check_model(str(tmp_path / "ok"))


def test_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set") as info:
        check_model("Qwen/Qwen2.5-VL-7B-Instruct")
    assert "make demo" in str(info.value) and "HF_TOKEN" in str(info.value)


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ModelUnavailable, match="127.0.0.1:9 cannot be reached"):
        check_model("cvssp/audioldm2-not-cached-anywhere")


def test_main_exits_with_advice_instead_of_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(b"png")
    assert cli.main(["--no_progress", "--vlm_model", "org/not-cached-model"]) == 3
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "make demo" in err and "Traceback" not in err
