"""A real Triton Inference Server (the 2.51 binary that nvidia-pytriton ships) on loopback, serving
a rendering of this project's model repository (deploy/triton) for tests.

Launched the way pytriton launches it: the bundled libraries on LD_LIBRARY_PATH, the Python backend's
stub for this interpreter's version next to the backend, and this interpreter's environment (its bin/
first on PATH, its lib dir for libpython) so the models import the project and its pinned packages.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO / "deploy" / "triton"


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (it is pinned in requirements.txt: make setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def render_repository(target: Path, *, cpu: bool = True, parameters: dict[str, dict[str, str]] | None = None) -> Path:
    """Copies deploy/triton to `target`; `cpu` turns the GPU instance groups into CPU ones; `parameters`
    ({model: {key: value}}) replaces string parameters of config.pbtxt."""
    shutil.copytree(MODEL_REPOSITORY, target, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    for model, values in (parameters or {}).items():
        path = target / model / "config.pbtxt"
        text = path.read_text()
        for key, value in values.items():
            text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\g<1>"{value}"', text)
            assert n == 1, f"parameter {key} not found exactly once in {path}"
        path.write_text(text)
    if cpu:
        for path in target.glob("*/config.pbtxt"):
            path.write_text(path.read_text().replace("kind: KIND_GPU", "kind: KIND_CPU"))
    return target


def _free_port() -> int:
    # Triton cannot bind port 0 and report it: take one the kernel says is free; start() retries on a clash.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    repository: Path
    workdir: Path
    extra_env: dict[str, str]
    process: subprocess.Popen | None = None
    url: str = ""
    extra_args: tuple[str, ...] = ()  # e.g. the TLS flags of deploy/k8s/components/tls
    client_options: dict | None = None  # how to reach it (tritonclient.grpc.InferenceServerClient keywords)
    client_host: str = "127.0.0.1"  # the name clients dial (with TLS: the one its certificate names)

    @property
    def log_file(self) -> Path:
        return self.workdir / "tritonserver.log"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _backends(self) -> Path:
        """The Python backend with the stub matching this interpreter (pytriton ships one per version)."""
        source = pytriton_dir() / "tritonserver"
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy(source / "backends" / "python" / name, backend / name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy(source / "python_backend_stubs" / version / "triton_python_backend_stub", backend)
        return backend.parent

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        libs = [str(pytriton_dir().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self, timeout_seconds: float = 300.0, attempts: int = 3) -> str:
        backends = self._backends()
        binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        for _ in range(attempts):
            port = _free_port()
            command = [
                str(binary), "--model-repository", str(self.repository), "--backend-directory", str(backends),
                "--model-control-mode", "explicit", "--load-model", "*",  # explicit: tests unload and reload
                "--grpc-address", "127.0.0.1", "--grpc-port", str(port),
                "--allow-http", "false", "--allow-metrics", "false", "--allow-gpu-metrics", "false",
                # A prefix of our own: other test sessions on this machine run Triton too (shared /dev/shm).
                "--backend-config", f"python,shm-region-prefix-name=i2s{uuid.uuid4().hex[:8]}",
                "--exit-timeout-secs", "5", "--log-verbose", "0", *self.extra_args,
            ]
            with open(self.log_file, "ab") as out:
                self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                                                start_new_session=True)
            self.url = f"{self.client_host}:{port}"
            if self._wait_ready(timeout_seconds):
                return self.url
            if "address already in use" not in self.log_tail(200).lower():
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
        raise RuntimeError(f"tritonserver found no free port in {attempts} attempts:\n{self.log_tail()}")

    def _wait_ready(self, timeout_seconds: float) -> bool:
        """Polls Triton's readiness with a bounded loop; False if the process died first."""
        import tritonclient.grpc as triton

        deadline = time.monotonic() + timeout_seconds
        with triton.InferenceServerClient(self.url, **(self.client_options or {})) as client:
            while True:
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        return True
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                try:
                    # Waiting on the process is the pause between polls: it ends at once if Triton dies.
                    self.process.wait(timeout=0.25)
                    return False
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Triton not ready in {timeout_seconds:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_seconds: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
