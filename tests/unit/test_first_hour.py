"""A newcomer's first hour (issue 20): each usual mistake ends in one line that says what to do, with no
traceback; a run shows a line per image and clip as they finish; files get the umask's mode; resume starts
only what it needs and says when settings changed; Ctrl-C ends with a summary and how to resume."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from i2s_cli import cli
from i2s_client import AsyncImageToSoundClient, ImageToSoundClient, OrchestratorUnavailable
from serving.server import GrpcServer, ServerOptions
from tests.fake_services import FakeVisionServicer, fake_stack

ROOT = Path(__file__).resolve().parents[2]
BOUND = 120


@pytest.fixture(scope="module")
def tiny_root(tiny_vlm_dir, tiny_audio_dir, tmp_path_factory) -> Path:
    """A folder with models/tiny/{vlm,audio} laid out as `make tiny-models` writes them (links to the session's
    tiny checkpoints, so a fresh checkout needs no `make tiny-models` first)."""
    root = tmp_path_factory.mktemp("first-hour")
    tiny = root / "models" / "tiny"
    tiny.mkdir(parents=True)
    (tiny / "vlm").symlink_to(tiny_vlm_dir, target_is_directory=True)
    (tiny / "audio").symlink_to(tiny_audio_dir, target_is_directory=True)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "empty").mkdir()
    shutil.copy(ROOT / "data" / "coffee.png", tmp_path / "data" / "coffee.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


DESCRIPTION = ('{"scene_description": "s", "mood_description": "m", "sound_sources": [{"name": "kettle", '
               '"material": "metal", "variants": [{"play_method": "whistling", "timbre": ["shrill"], '
               '"mapping_to_music_instrument": "None"}]}]}')


def write_description(workspace: Path) -> Path:
    """coffee's description, as an earlier run (or the seed) wrote it."""
    path = workspace / "sound_sources" / "coffee" / "coffee_sound_source.json"
    path.parent.mkdir(parents=True)
    path.write_text(DESCRIPTION)
    return path


def one_line_error(err: str, message: str) -> None:
    """`message` is on one line of stderr, and nothing looks like a traceback."""
    assert "Traceback" not in err and 'File "' not in err, err
    assert any(message in line for line in err.splitlines()), err


# The command line: (arguments, exit code, what the one line says). {free} is a port nothing listens on.
CLI_CASES = [
    (["--orchestrator", "50050"], 2, "'50050' is a port alone: give host:port, e.g. localhost:50050"),
    (["--orchestrator", "127.0.0.1:{free}", "--wait_seconds", "1"], 3, "is the orchestrator running?"),
    (["--vlm_model", "{tiny}/vlmm", "--audio_model", "{tiny}/audio"], 3, "/vlmm: no such folder (in "),
    (["--vlm_model", "{tiny}/audio", "--audio_model", "{tiny}/vlm"], 3,
     "are the VLM and audio model folders swapped?"),
    (["--skip_vlm", "--audio_model", "{tiny}/vlm"], 3, "not an AudioLDM2 pipeline (model_index.json)"),
    (["--data_dir", "empty"], 2, "no images (bmp, jpeg, jpg, png, webp) found under empty/"),
    (["--single", "data/cofee.png"], 2, "--single data/cofee.png: no such file"),
    (["--audio_seconds", "400"], 2, "sound settings: duration_seconds=400.0 must be within 1..300"),
    (["--audio_seconds", "1.5", "--loop"], 2, "loop needs a clip of at least 2 s"),
    (["--reject_speech_music", "-1"], 2, "-1 is not within 0..8"),
]


@pytest.mark.parametrize("argv, code, message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_command_line_mistakes_end_in_one_line(workspace, tiny_root, capsys, argv, code, message):
    tiny = tiny_root / "models" / "tiny"
    if "--skip_vlm" in argv:
        write_description(workspace)
    argv = [a.format(free=free_port(), tiny=tiny) for a in argv]
    try:
        got = cli.main(["--no_progress", *argv])
    except SystemExit as exc:  # argparse's own errors: usage line, then the message
        got = exc.code
    assert got == code
    one_line_error(capsys.readouterr().err, message.format(tiny=tiny))


def service(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=BOUND,
                          cwd=cwd)


# The services: (module, arguments, what the one line says). Each fails before any model loads.
SERVICE_CASES = [
    ("vlm_service", ["--model", "models/tiny/vlmm"], "python -m vlm_service: error: --model models/tiny/vlmm: "
     "no such folder (in models/tiny/: audio, vlm)"),
    ("vlm_service", ["--model", "models/tiny/audio"], "is an AudioLDM2 pipeline (model_index.json), not a "
     "Qwen2.5-VL checkpoint (config.json): are the VLM and audio model folders swapped?"),
    ("audio_service", ["--model", "models/tiny/vlm"], "python -m audio_service: error: --model models/tiny/vlm is "
     "a Qwen2.5-VL checkpoint"),
    ("orchestrator", ["--port", "{busy}"], "python -m orchestrator: error: port {busy} on 127.0.0.1 is already in "
     "use (another service still running?): stop it, or pass --port N (0: any free port)"),
    ("audio_service", ["--model", "models/tiny/audio", "--port", "{busy}"], "is already in use"),
    ("audio_service", ["--model", "models/tiny/audio", "--cache-url", "redis://127.0.0.1:port/0"],
     "python -m audio_service: error: --cache-url redis://127.0.0.1:port/0: malformed (Port could not be cast to "
     "integer value as 'port'); give redis://host:port/db"),
    ("vlm_service", ["--model", "models/tiny/vlm", "--cache-url", "http://cache:6379"], "--cache-url "
     "http://cache:6379: not a redis://host:port/db URL (empty: this process's memory; off: no cache)"),
    # Something listens there, but it is no Redis: no answer to PING within the start-up check's bound.
    ("vlm_service", ["--model", "models/tiny/vlm", "--cache-url", "redis://127.0.0.1:{busy}/0"],
     "python -m vlm_service: error: --cache-url redis://127.0.0.1:{busy}/0: Redis does not answer"),
]


@pytest.mark.parametrize("module, argv, message", SERVICE_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in SERVICE_CASES])
def test_service_mistakes_end_in_one_line(tiny_root, module, argv, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        done = service(module, *[a.format(busy=port) for a in argv], cwd=tiny_root)
    assert done.returncode == 2
    one_line_error(done.stderr, message.format(busy=port))


async def test_the_client_waits_for_readiness_and_says_what_is_wrong():
    nothing = f"127.0.0.1:{free_port()}"
    with ImageToSoundClient(nothing) as client, pytest.raises(OrchestratorUnavailable, match="is the orchestrator running"):
        await asyncio.to_thread(client.wait_for_ready, 0.5)
    # Listening but NOT_SERVING (its models are loading): a different message.
    loading = GrpcServer(ServerOptions(port=0, grace_seconds=0), lambda server: None, ["image_to_sound.v1.Orchestrator"])
    await loading.start()
    try:
        async with AsyncImageToSoundClient(loading.address) as client:
            with pytest.raises(OrchestratorUnavailable, match="answers but was not ready"):
                await client.wait_for_ready(0.5)
    finally:
        await loading.stop()
    async with fake_stack() as (target, _, _):
        with ImageToSoundClient(target) as client:
            await asyncio.to_thread(client.wait_for_ready, 10)  # SERVING: returns
            result = await asyncio.to_thread(client.generate, ROOT / "data" / "coffee.png", duration_seconds=1)
        assert result.ok and len(result.clips) == 6


def clip_lines(err: str) -> list[str]:
    return [line.split(": clip ", 1)[1] for line in err.splitlines() if ": clip " in line]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
async def test_a_non_terminal_run_logs_each_image_and_clip_as_it_finishes(workspace, capsys, umask):
    shutil.copy(ROOT / "data" / "space" / "rocket.jpg", workspace / "data" / "rocket.jpg")
    (workspace / "data" / "chelsea.webp").write_bytes(_webp(ROOT / "data" / "animals" / "chelsea.png"))
    previous = os.umask(umask)
    try:
        async with fake_stack() as (target, vision, audio):
            argv = ["--orchestrator", target, "--audio_seconds", "1"]  # no --no_progress: stderr is no terminal
            assert await asyncio.wait_for(asyncio.to_thread(cli.main, argv), BOUND) == 0
    finally:
        os.umask(previous)
    err = capsys.readouterr().err
    assert vision.calls == 3  # the WebP image too
    lines = clip_lines(err)
    wavs = sorted(Path("result").rglob("*.wav"), key=lambda p: p.stat().st_mtime_ns)
    assert len(lines) == 18 and lines == [str(p) for p in wavs]  # one line per clip, as each was written
    err_lines = err.splitlines()
    for key in ("data/coffee.png", "data/rocket.jpg", "data/chelsea.webp"):
        done = [i for i, line in enumerate(err_lines) if f"{key}: done (6 clip(s))" in line]
        clips = [i for i, line in enumerate(err_lines) if f"{key}: clip " in line]
        assert len(done) == 1 and len(clips) == 6 and max(clips) < done[0], key  # each image's line, as it ended
    written = [p for folder in ("sound_sources", "result") for p in Path(folder).rglob("*") if p.is_file()]
    assert len(written) == 3 + 18 + 3 + 1 + 18  # descriptions, clips, manifests; the gallery and a spectrogram per clip
    assert {p.stat().st_mode & 0o777 for p in written} == {0o666 & ~umask}


def _webp(png: Path) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(png).convert("RGB").save(out, format="WEBP")
    return out.getvalue()


async def test_resume_says_when_settings_changed(workspace, capsys):
    async with fake_stack() as (target, vision, _):
        argv = ["--orchestrator", target, "--no_progress", "--audio_seconds", "1"]
        assert await asyncio.to_thread(cli.main, argv) == 0
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, [*argv[:-1], "2"]) == 0
        assert vision.calls == 1
    err = capsys.readouterr().err
    one_line_error(err, "1 image(s) kept from an earlier run with other audio settings (duration_seconds 1.0 (now 2.0)")
    assert "pass --overwrite to redo them" in err


class FakeServicesRecording:
    """Stands in for EmbeddedServices to see which models a run asks for; its start fails like a dying service."""

    asked: dict = {}

    def __init__(self, **kwargs):
        FakeServicesRecording.asked = kwargs
        self.logs = Path(kwargs["logs_dir"] or "unused")

    def start(self):
        from i2s_cli.embedded import ServiceFailed

        raise ServiceFailed("the audio service exited with code 1 while starting: RuntimeError: out of memory")

    def keep_logs(self, folder):
        return Path(folder)

    def stop(self):
        return {}

    def close(self):
        pass


def test_resume_starts_only_the_models_it_needs(workspace, tiny_root, capsys, monkeypatch):
    tiny = tiny_root / "models" / "tiny"
    monkeypatch.setattr("i2s_cli.embedded.EmbeddedServices", FakeServicesRecording)
    description = write_description(workspace)
    argv = ["--no_progress", "--vlm_model", str(tiny / "vlm"), "--audio_model", str(tiny / "audio")]
    assert cli.main(argv) == 3
    assert FakeServicesRecording.asked["vlm_model"] is None  # the description exists: no VLM to load
    assert FakeServicesRecording.asked["audio_model"] == str(tiny / "audio")
    err = capsys.readouterr().err
    one_line_error(err, "the audio service exited with code 1 while starting: RuntimeError: out of memory (its log: ")
    assert str(workspace / "service_logs") in err  # kept beside the results
    description.unlink()
    assert cli.main(argv) == 3
    assert FakeServicesRecording.asked["vlm_model"] == str(tiny / "vlm")


async def test_ctrl_c_ends_with_a_summary_and_how_to_resume(workspace):
    shutil.copy(ROOT / "data" / "space" / "rocket.jpg", workspace / "data" / "rocket.jpg")
    vision = FakeVisionServicer(hold_after_first_source=True)  # the run hangs after the first source's clips
    async with fake_stack(vision=vision) as (target, _, _):
        run = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--orchestrator", target, "--no_progress",
                                "--audio_seconds", "1"], stderr=subprocess.PIPE, text=True, cwd=workspace,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = ""
            while ": clip " not in line:  # a clip finished: the run is under way
                line = await asyncio.wait_for(asyncio.to_thread(run.stderr.readline), BOUND)
                assert line, "main.py ended before any clip"
            run.send_signal(signal.SIGINT)
            rest = await asyncio.wait_for(asyncio.to_thread(run.stderr.read), BOUND)
            code = await asyncio.to_thread(run.wait, BOUND)
        finally:
            vision.release.set()
            if run.poll() is None:
                run.kill()
    assert code == 130
    one_line_error(rest, "interrupted: what finished is kept; run the same command again to resume")
    assert "not finished" in rest


def test_a_service_that_dies_while_starting_says_why_in_one_line_and_leaves_its_log(tmp_path):
    from i2s_cli.embedded import EmbeddedServices, ServiceFailed

    missing = tmp_path / "no-such-model"
    services = EmbeddedServices(vlm_model=str(missing), audio_model=None, start_timeout_seconds=BOUND)
    try:
        with pytest.raises(ServiceFailed) as info:
            services.start()
        assert str(info.value) == (f"the vlm service exited with code 2 while starting: python -m vlm_service: error: "
                                   f"--model {missing}: no such folder; give a checkpoint folder or a hub id like "
                                   f"owner/name")
        kept = services.keep_logs(tmp_path / "service_logs")
        assert "no such folder" in (kept / "vlm.log").read_text()
    finally:
        services.stop()
        services.close()
