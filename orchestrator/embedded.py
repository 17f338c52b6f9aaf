"""Embedded mode: the three services as local child processes on loopback, for the command line,
`make run` and `make demo`. The same processes, flags and gRPC calls as a distributed deployment;
only the addresses are chosen for you (port 0, reported through --port-file)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving import channels
from serving.health import wait_serving
from serving.threads import threads_per_service

log = logging.getLogger(__name__)


MODEL_MODULES = ("vlm_service", "audio_service")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class ServiceFailed(RuntimeError):
    """A child service exited or never became ready; the message ends with its log."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    port_file: Path
    log_file: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _exited(process: subprocess.Popen) -> None:
    # Popen has no awaitable wait; a thread blocked in wait() would outlive the event loop.
    while process.poll() is None:
        await asyncio.sleep(0.2)


@dataclass
class EmbeddedServices:
    """Starts VLM, audio and orchestrator services; `target` is the orchestrator's address."""

    vlm_model: str | None  # None: no VLM service (descriptions given, the seed's --skip_vlm)
    audio_model: str | None  # None: no audio service (the seed's --skip_audio)
    device: str | None = None  # e.g. "cpu"; None lets each service pick (cuda if available)
    vlm_device: str | None = None
    audio_device: str | None = None
    start_timeout_seconds: float = 1800.0  # first runs download the real weights
    torch_threads: int = 0  # per model service; 0: the machine's cores divided between the model services
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[_Child] = field(default_factory=list)
    target: str = ""

    def __post_init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="i2s-embedded-")
        self.log_dir = Path(self._tmp.name)

    def _spawn(self, name: str, module: str, args: list[str]) -> _Child:
        port_file = self.log_dir / f"{name}.port"
        log_file = self.log_dir / f"{name}.log"
        # The native thread pools besides torch's (OpenMP, OpenBLAS, MKL) size themselves from the
        # environment when loaded; they get the same share, unless the user set them.
        threads = str(self.model_threads() if module in MODEL_MODULES else 1)
        env = {**{variable: threads for variable in THREAD_VARIABLES}, **os.environ, **self.extra_env}
        command = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), *args]
        with open(log_file, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        child = _Child(name, process, port_file, log_file)
        self.children.append(child)
        return child

    def _port(self, child: _Child, deadline: float) -> int:
        # The port file appears within a second of start (before the model loads); polling is fine here.
        while not child.port_file.exists():
            if child.process.poll() is not None:
                raise ServiceFailed(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{child.name} did not open its port:\n{child.log_tail()}")
            time.sleep(0.05)
        return int(child.port_file.read_text().strip())

    def _wait_serving(self, child: _Child, port: int, deadline: float) -> None:
        """Waits for `child` to say SERVING; fails fast if any child exits meanwhile."""

        async def wait() -> None:
            channel = channels.aio_channel(f"127.0.0.1:{port}")
            waiter = asyncio.ensure_future(wait_serving(channel, timeout=max(1.0, deadline - time.monotonic())))
            exits = {asyncio.ensure_future(_exited(c.process)): c for c in self.children}
            try:
                done, _ = await asyncio.wait({waiter, *exits}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    waiter.result()
                    return
                dead = exits[next(iter(done))]
                raise ServiceFailed(f"{dead.name} exited with {dead.process.returncode}:\n{dead.log_tail()}")
            finally:
                for task in (waiter, *exits):
                    task.cancel()
                await channel.close()

        try:
            asyncio.run(wait())
        except TimeoutError:
            raise ServiceFailed(f"{child.name} was not SERVING in time:\n{child.log_tail()}") from None

    def model_threads(self) -> int:
        """torch threads for each model service: the cores shared by those this run starts, so that two
        services on two cores do not run four threads."""
        if self.torch_threads > 0:
            return self.torch_threads
        return threads_per_service(sum(1 for m in (self.vlm_model, self.audio_model) if m))

    def start(self) -> str:
        deadline = time.monotonic() + self.start_timeout_seconds
        try:
            device_args = lambda d: ["--device", d] if d else []  # noqa: E731
            threads = ["--torch-threads", str(self.model_threads())]
            models = []
            if self.vlm_model:
                models.append(self._spawn("vlm", "vlm_service", ["--model", self.vlm_model, *threads,
                                                                 *device_args(self.vlm_device or self.device)]))
            if self.audio_model:
                models.append(self._spawn("audio", "audio_service", ["--model", self.audio_model, *threads,
                                                                     *device_args(self.audio_device or self.device)]))
            targets = {c.name: f"127.0.0.1:{self._port(c, deadline)}" for c in models}
            orch = self._spawn("orchestrator", "orchestrator",
                               ["--vlm", targets.get("vlm", ""), "--audio", targets.get("audio", "")])
            port = self._port(orch, deadline)
            # The orchestrator says SERVING only once both model services do.
            self._wait_serving(orch, port, deadline)
        except BaseException:
            self.stop()
            raise
        self.target = f"127.0.0.1:{port}"
        return self.target

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM (graceful: NOT_SERVING, drain), then SIGKILL whatever is still alive.
        Returns each service's exit code (0 after a clean shutdown)."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, timeout)
                child.process.kill()
                child.process.wait()
        codes = {child.name: child.process.returncode for child in self.children}
        self.children.clear()
        return codes

    def __enter__(self) -> "EmbeddedServices":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()
