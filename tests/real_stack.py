"""The three services with the tiny real checkpoints on loopback, for the fault, load and bad-input suites.

`real_stack` runs them in this process (servicers and backends reachable for assertions);
`ServiceProcess` runs one as a child process, for faults that need a real process (SIGKILL, SIGTERM).
Everything is bounded: start-up waits have timeouts and processes are killed on the way out.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from serving import metrics
from serving.health import wait_serving
from serving.server import ServerOptions

START_TIMEOUT = 120.0


def png(size=(64, 48), mode="RGB", color=(40, 90, 160)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def in_flight(method: str) -> float:
    """The in-flight gauge of `method` in this process (all in-process servers share the registry)."""
    return metrics.IN_FLIGHT.labels(method=method)._value.get()


@dataclass
class RealStack:
    target: str  # the orchestrator
    vlm_target: str
    audio_target: str
    orchestrator: object
    vlm_servicer: object
    audio_servicer: object
    audio_backend: object


@contextlib.asynccontextmanager
async def real_stack(vlm_dir, audio_dir, *, audio_target: str | None = None, audio_backend=None, **orchestrator):
    """VLM + audio (tiny real models) + the orchestrator, in-process, SERVING. `audio_target` points the
    orchestrator at an audio service running elsewhere (a ServiceProcess) instead of starting one;
    `audio_backend` replaces the tiny diffusers backend (a wrapper that injects faults)."""
    from audio_service.config import AudioConfig
    from audio_service.diffusers_backend import DiffusersAudioBackend
    from audio_service.server import load_and_warm as warm_audio, make_server as audio_server
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import Orchestrator
    from serving.images import ImageLimits
    from vlm_service.config import VlmConfig
    from vlm_service.server import load_and_warm as warm_vlm, make_server as vlm_server
    from vlm_service.transformers_backend import TransformersVisionBackend

    options = ServerOptions(port=0, grace_seconds=1)
    vlm_backend = TransformersVisionBackend(str(vlm_dir), device="cpu", max_pixels=64 * 28 * 28)
    vlm, vlm_servicer = vlm_server(VlmConfig(model=str(vlm_dir), image_limits=ImageLimits(), server=options), vlm_backend)
    await vlm.start()
    await asyncio.to_thread(warm_vlm, vlm_backend)
    await vlm.set_serving(True)
    audio = audio_servicer = None
    if audio_target is None:
        audio_backend = audio_backend or DiffusersAudioBackend(str(audio_dir), device="cpu")
        audio, audio_servicer = audio_server(AudioConfig(model=str(audio_dir), max_wait_ms=20, server=options), audio_backend)
        await audio.start()
        await asyncio.to_thread(warm_audio, audio_backend)
        await audio.set_serving(True)
        audio_target = audio.address
    config = OrchestratorConfig(vlm_target=vlm.address, audio_target=audio_target, server=options)
    config = replace(config, **orchestrator)
    orch = Orchestrator(config)
    await orch.server.start()
    try:
        await orch.wait_for_backends(timeout=START_TIMEOUT)
        await orch.server.set_serving(True)
        yield RealStack(orch.server.address, vlm.address, audio_target, orch, vlm_servicer, audio_servicer, audio_backend)
    finally:
        await orch.server.stop()
        await orch.close()
        if audio is not None:
            await audio.stop()
            await audio_servicer.close()
            audio_backend.close()
        await vlm.stop()
        vlm_servicer.close()
        vlm_backend.close()


class ServiceProcess:
    """One service as a child process on loopback (`python -m <module> --port-file ...`)."""

    def __init__(self, module: str, args: list[str], port: int = 0, host: str = "127.0.0.1"):
        self._tmp = tempfile.TemporaryDirectory(prefix="i2s-fault-")
        self.port_file = Path(self._tmp.name) / "port"
        self.log_file = Path(self._tmp.name) / "log"
        self.host = host
        threads = ["--torch-threads", "1"] if module in ("vlm_service", "audio_service") else []  # a shared 2-core box
        command = [sys.executable, "-m", module, "--host", host, "--port", str(port),
                   "--port-file", str(self.port_file), *threads, *args]
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                            start_new_session=True)
        self.port = 0

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    async def serving(self, timeout: float = START_TIMEOUT) -> "ServiceProcess":
        """Waits until the process listens and says SERVING (fails at once if it exits)."""
        async def port() -> int:
            while not self.port_file.exists() or not self.port_file.read_text().strip():
                if self.process.poll() is not None:
                    raise RuntimeError(f"exited with {self.process.returncode}:\n{self.log()}")
                await asyncio.sleep(0.05)  # polling a file the child writes: there is nothing to wait on
            return int(self.port_file.read_text())

        self.port = await asyncio.wait_for(port(), timeout)
        async with grpc.aio.insecure_channel(self.target) as channel:
            await wait_serving(channel, timeout=timeout)
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, as when a pod or a GPU node dies."""
        self.process.kill()
        self.process.wait(timeout=30)

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._tmp.cleanup()


def audio_process(audio_dir, port: int = 0, *extra: str) -> ServiceProcess:
    return ServiceProcess("audio_service", ["--model", str(audio_dir), "--device", "cpu", "--max-wait-ms", "20", *extra],
                          port=port)
