"""Embedded mode: the three services as local child processes on loopback, for the command line,
`make run` and `make demo`. The same processes, flags and gRPC calls as a distributed deployment;
only the addresses are chosen for you (port 0, reported through --port-file)."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import threading
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


# A tqdm bar (downloads, loading checkpoint shards): relayed at most every PROGRESS_EVERY seconds per service.
PROGRESS_BAR = re.compile(r"\d+%\|")
PROGRESS_EVERY = 10.0
# The services' time stamp and name, and the level and logger of INFO lines (warnings keep theirs).
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (INFO \S+: )?")


class ServiceFailed(RuntimeError):
    """A child service exited or never became ready; the message is one line ending with its last log line."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    port_file: Path
    log_file: Path
    relayed: int = 0  # bytes of the log already relayed to ours
    progress_at: float = 0.0  # when a progress bar line was last relayed

    def last_line(self) -> str:
        """The log's last line that says something (a traceback's last line is the error itself)."""
        lines = [line.strip() for line in self.log_tail(50).replace("\r", "\n").splitlines() if line.strip()]
        return LOG_PREFIX.sub("", lines[-1]) if lines else "(nothing in its log)"

    def failure(self, what: str) -> str:
        return f"the {self.name} service {what}: {self.last_line()}"

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
    logs_dir: str | None = None  # keep the services' logs there; None: a temporary folder (see keep_logs)
    relay_logs: bool = True  # log the services' start-up lines (model loading, download progress) as ours
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[_Child] = field(default_factory=list)
    target: str = ""

    def __post_init__(self) -> None:
        self._tmp = None if self.logs_dir else tempfile.TemporaryDirectory(prefix="i2s-embedded-")
        self.log_dir = Path(self.logs_dir) if self.logs_dir else Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def relay(self) -> None:
        """Logs what the services wrote since the last call (their start-up, and on a first run the model
        downloads, which take minutes): the user sees progress instead of silence."""
        if not self.relay_logs:
            return
        for child in list(self.children):
            try:
                with open(child.log_file, "rb") as f:
                    f.seek(child.relayed)
                    data = f.read()
            except OSError:
                continue
            complete = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1  # a partial line waits for the next call
            child.relayed += complete
            for line in re.split(r"[\r\n]+", data[:complete].decode(errors="replace")):
                line = LOG_PREFIX.sub("", line).strip()
                if not line:
                    continue
                if PROGRESS_BAR.search(line):
                    now = time.monotonic()
                    if now - child.progress_at < PROGRESS_EVERY:
                        continue
                    child.progress_at = now
                log.info("%s: %s", child.name, line)

    def keep_logs(self, folder: str | Path) -> Path:
        """Copies the services' logs into `folder` (unless they are written there already); returns it."""
        folder = Path(folder)
        if self._tmp is None:
            return self.log_dir
        folder.mkdir(parents=True, exist_ok=True)
        for log_file in self.log_dir.glob("*.log"):
            shutil.copyfile(log_file, folder / log_file.name)
        return folder

    def close(self) -> None:
        """Deletes the temporary log folder (not one given as logs_dir)."""
        if self._tmp is not None:
            self._tmp.cleanup()

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
                self.relay()
                raise ServiceFailed(child.failure(f"exited with code {child.process.returncode} while starting"))
            if time.monotonic() > deadline:
                raise ServiceFailed(child.failure("did not open its port in time"))
            time.sleep(0.05)
        return int(child.port_file.read_text().strip())

    def _wait_serving(self, child: _Child, port: int, deadline: float) -> None:
        """Waits for `child` to say SERVING; fails fast if any child exits meanwhile."""

        async def wait() -> None:
            channel = channels.aio_channel(f"127.0.0.1:{port}")
            waiter = asyncio.ensure_future(wait_serving(channel, timeout=max(1.0, deadline - time.monotonic())))
            exits = {asyncio.ensure_future(_exited(c.process)): c for c in self.children}
            relaying = asyncio.ensure_future(self._relay_every(0.5))
            try:
                done, _ = await asyncio.wait({waiter, *exits}, return_when=asyncio.FIRST_COMPLETED)
                self.relay()
                if waiter in done:
                    waiter.result()
                    return
                dead = exits[next(iter(done))]
                raise ServiceFailed(dead.failure(f"exited with code {dead.process.returncode} while starting"))
            finally:
                for task in (waiter, relaying, *exits):
                    task.cancel()
                await channel.close()

        try:
            asyncio.run(wait())
        except TimeoutError:
            raise ServiceFailed(child.failure(f"was not ready within {self.start_timeout_seconds:.0f} s")) from None

    async def _relay_every(self, seconds: float) -> None:
        # The services write their logs to files; there is nothing to wait on but time.
        while True:
            self.relay()
            await asyncio.sleep(seconds)

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
            # Only this run's orchestrator calls these services, and it stops with them: no drain notice
            # (it holds health NOT_SERVING for other clients to move away; here there are none).
            threads = ["--torch-threads", str(self.model_threads()), "--drain-notice-seconds", "0"]
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
        Returns each service's exit code (0 after a clean shutdown). A second Ctrl-C meanwhile is ignored:
        interrupting this would leave the services running."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main and self.children else None
        try:
            return self._stop(timeout)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, timeout: float) -> dict[str, int]:
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
        self.close()
