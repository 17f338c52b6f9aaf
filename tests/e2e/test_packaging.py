"""The project as a package: `pip install .` into a fresh venv, then the console scripts start the
services and answer health. No `.pth` files, `sys.path` edits or PYTHONPATH in the source tree."""
import os
import shutil
import subprocess
import sys
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
SKIP_DIRS = {".venv", ".git", "models", "demo_out", "__pycache__", "build", "sound_sources", "result", ".whl"}


def _clean_copy(dest: Path) -> Path:
    """The source tree as a fresh clone has it: no venv, no generated stubs, no build output."""
    def ignore(folder, names):
        return {n for n in names if n in SKIP_DIRS or "_pb2" in n or n.endswith(("_connect.py", ".egg-info"))}

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from a clean copy (non-editable). The pinned third-party
    dependencies are borrowed from the test's own environment through one line in the NEW venv's
    site-packages, so the test checks our packaging (modules, generated stubs, package data, console
    scripts) without downloading torch again."""
    tmp = tmp_path_factory.mktemp("pkg")
    source = _clean_copy(tmp / "src")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    Path(site, "borrowed_dependencies.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", str(source)], check=True)
    shutil.rmtree(source)  # nothing may come from the source tree after installation
    return venv


def _health(target: str, timeout: float = 600.0) -> int:
    """The server's overall health once it answers (it binds before loading, so this is quick)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True).status


def _wait_serving(target: str, timeout: float = 600.0) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True):
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(venv: Path, script: str, args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Starts a console script on a free port; callers synchronise on its health (wait_for_ready)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen([str(venv / "bin" / script), "--port", str(port), *args],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"127.0.0.1:{port}"


def test_console_scripts_of_the_installed_package_serve_health(installed, tiny_vlm_dir, tiny_audio_dir, tmp_path):
    processes = []
    try:
        vlm, vlm_target = _start(installed, "i2s-vlm", ["--model", str(tiny_vlm_dir), "--device", "cpu"], tmp_path)
        audio, audio_target = _start(installed, "i2s-audio", ["--model", str(tiny_audio_dir), "--device", "cpu"], tmp_path)
        processes += [vlm, audio]
        orchestrator, target = _start(installed, "i2s-orchestrator", ["--vlm", vlm_target, "--audio", audio_target],
                                      tmp_path)
        processes.append(orchestrator)
        for t in (vlm_target, audio_target, target):
            _wait_serving(t, timeout=300)
            assert _health(t) == health_pb2.HealthCheckResponse.SERVING
        for process in processes:
            process.terminate()
        assert [p.wait(timeout=60) for p in processes] == [0, 0, 0]  # SIGTERM is a clean shutdown
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_the_installed_package_carries_stubs_prompts_and_scripts_but_no_tiny_builders(installed):
    python = installed / "bin" / "python"
    code = ("import image_to_sound.v1.orchestrator_pb2_grpc, vlm_prompt.loader as l, importlib.util as u;"
            "import image_to_sound.v1.orchestrator_connect, gateway.app as g;"
            "print(l.load_prompt('v1').schema['type'], (g.STATIC / 'index.html').is_file(), (g.STATIC / 'app.js').is_file());"
            "print(u.find_spec('vlm_service.tiny') is None and u.find_spec('audio_service.tiny') is None);"
            "import i2s_client, i2s_formats.seed_format, i2s_cli.gallery as gal, pathlib;"
            "print(i2s_client.ImageToSoundClient.__module__, (pathlib.Path(gal.__file__).with_name('templates') /"
            " 'gallery.html').is_file())")
    out = subprocess.run([str(python), "-c", code], cwd=installed, check=True, capture_output=True, text=True).stdout
    assert out.split() == ["object", "True", "True", "True", "i2s_client.client", "True"]
    for script in ("i2s", "i2s-vlm", "i2s-audio", "i2s-orchestrator"):
        assert (installed / "bin" / script).exists()
    help_text = subprocess.run([str(installed / "bin" / "i2s"), "--help"], check=True, capture_output=True,
                               text=True).stdout
    assert "--skip_vlm" in help_text


def test_no_path_tricks_in_the_source_tree():
    """The package is importable because it is installed; nothing edits the import path by hand."""
    offenders = []
    for path in ROOT.rglob("*"):
        if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if path.suffix == ".pth":
            offenders.append(str(path))
        elif path.suffix in {".py", ".ini", ".cfg", ".toml"} or path.name == "Makefile":
            text = path.read_text(errors="ignore")
            if path == Path(__file__):
                continue
            for needle in ("sys.path.insert", "sys.path.append", "PYTHONPATH", "pythonpath =", ".pth'", '.pth"'):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []
