"""The project's real services as child processes for the benchmark, with their start-up times and GPU memory.

Reuses i2s_cli/embedded.py's spawning (port 0, --port-file, logs in a temp folder); adds extra flags
per service (to measure variants without editing the bench), per-service start-up times, and a GPU
memory sampler (nvidia-smi: torch's own counters cannot be read across processes).
"""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from i2s_cli.embedded import EmbeddedServices, ServiceFailed
from serving import channels
from serving.health import wait_serving


@dataclass
class Started:
    child: Any  # the spawned service (EmbeddedServices' child: name, process, log_tail())
    address: str
    spawned_at: float
    port_seconds: float = 0.0  # spawn -> port file (process up, gRPC listening, NOT_SERVING)
    serving_seconds: float = 0.0  # spawn -> SERVING (load, compile, warm-up)


@dataclass
class BenchServices(EmbeddedServices):
    """Starts the model services (and the orchestrator, if asked) and times each one's start-up."""

    vlm_args: list[str] = field(default_factory=list)
    audio_args: list[str] = field(default_factory=list)
    started: dict[str, Started] = field(default_factory=dict)

    def start_services(self, *, vlm: bool, audio: bool, orchestrator: bool) -> dict[str, Started]:
        deadline = time.monotonic() + self.start_timeout_seconds
        device = ["--device", self.device] if self.device else []
        try:
            spawned = []
            if vlm:
                spawned.append((self._spawn("vlm", "vlm_service", ["--model", self.vlm_model, *device, *self.vlm_args]),
                                time.perf_counter()))
            if audio:
                spawned.append((self._spawn("audio", "audio_service",
                                            ["--model", self.audio_model, *device, *self.audio_args]),
                                time.perf_counter()))
            for child, at in spawned:
                port = self._port(child, deadline)
                self.started[child.name] = Started(child, f"127.0.0.1:{port}", at, time.perf_counter() - at)
            asyncio.run(self._wait_all(list(self.started.values()), deadline))
            if orchestrator:
                at = time.perf_counter()
                child = self._spawn("orchestrator", "orchestrator", [
                    "--vlm", self.started["vlm"].address if vlm else "",
                    "--audio", self.started["audio"].address if audio else "",
                ])
                port = self._port(child, deadline)
                orch = Started(child, f"127.0.0.1:{port}", at, time.perf_counter() - at)
                self.started["orchestrator"] = orch
                asyncio.run(self._wait_all([orch], deadline))
                self.target = orch.address
        except BaseException:
            self.stop()
            raise
        return self.started

    async def _wait_all(self, items: list[Started], deadline: float) -> None:
        """Waits for every service to say SERVING (concurrently, so each time is its own); fails fast on exit."""

        async def one(item: Started) -> None:
            channel = channels.aio_channel(item.address)
            try:
                await wait_serving(channel, timeout=max(1.0, deadline - time.monotonic()))
                item.serving_seconds = time.perf_counter() - item.spawned_at
            finally:
                await channel.close()

        async def exited(child: Any) -> None:
            while child.process.poll() is None:
                await asyncio.sleep(0.2)
            raise ServiceFailed(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")

        waiters = asyncio.gather(*(one(item) for item in items))
        watchers = [asyncio.ensure_future(exited(c)) for c in self.children]
        try:
            done, _ = await asyncio.wait({waiters, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        except TimeoutError:
            raise ServiceFailed("a service was not SERVING in time:\n"
                                + "\n".join(c.log_tail(10) for c in self.children)) from None
        finally:
            for task in watchers:
                task.cancel()
            waiters.cancel()

    def serving_paths(self) -> dict[str, dict[str, str]]:
        """What each model service's health answer says serves it (serving.fast_path: the path after its
        self-check, and why it is not the fast one, if it is not): the bench labels rows by this only."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async def one(item: Started) -> dict[str, str]:
            channel = channels.aio_channel(item.address)
            try:
                call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                await call
                return {k.removeprefix("i2s-"): v for k, v in (await call.initial_metadata() or ())
                        if k.startswith("i2s-")}
            finally:
                await channel.close()

        async def every() -> dict[str, dict[str, str]]:
            names = [n for n in self.started if n != "orchestrator"]
            return dict(zip(names, await asyncio.gather(*(one(self.started[n]) for n in names))))

        return asyncio.run(every())

    def log_text(self, name: str) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""


def audio_startup_breakdown(log: str) -> dict[str, float | None]:
    """Load and warm-up seconds from the audio service's log lines (diffusers_backend logs both)."""
    load = re.search(r"loaded .* in ([0-9.]+) s", log)
    warm = re.search(r"warm-up \(compile=([^)]*)\) of (\d+) shapes in ([0-9.]+) s", log)
    return {
        "load_s": float(load.group(1)) if load else None,
        "warmup_s": float(warm.group(3)) if warm else None,
        "warmed_shapes": int(warm.group(2)) if warm else None,
        "compile": warm.group(1) if warm else None,
    }


class GpuMemorySampler:
    """Peak GPU memory per process (and for the whole GPU) from nvidia-smi, sampled every `period` s.

    It counts what the process holds on the device (CUDA context, allocator cache, tensors), which is
    what a deployment must provision. None everywhere when nvidia-smi is absent (CPU runs).
    """

    def __init__(self, pids: dict[str, int], period: float = 0.25):
        self.pids = pids
        self.period = period
        self.available = shutil.which("nvidia-smi") is not None
        self.peak_mib: dict[str, float | None] = {name: None for name in pids}
        self.peak_gpu_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)

    def _query(self, what: str, fields: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [[x.strip() for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]

    def sample(self) -> None:
        by_pid = {pid: name for name, pid in self.pids.items()}
        for pid, used in self._query("compute-apps", "pid,used_memory"):
            name = by_pid.get(int(pid)) if pid.isdigit() else None
            if name is not None and used.replace(".", "").isdigit():
                self.peak_mib[name] = max(self.peak_mib[name] or 0.0, float(used))
        rows = self._query("gpu", "memory.used")
        if rows:
            total = sum(float(r[0]) for r in rows if r[0].replace(".", "").isdigit())
            self.peak_gpu_mib = max(self.peak_gpu_mib or 0.0, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> "GpuMemorySampler":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
