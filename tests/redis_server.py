"""A real Redis for the shared result cache's tests: Debian's `redis-server` (installed by `make test`) on a
free loopback port, nothing saved to disk, ready once it logs so; stopped (or killed by a test) at the end."""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

READY_LINE = "Ready to accept connections"
BOUND = 30.0  # seconds for the server to start or stop


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """Gone at once, as a crashed or deleted pod is (no orderly shutdown)."""
        self.process.kill()
        self.process.wait(BOUND)


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    executable = shutil.which("redis-server")
    assert executable, "redis-server is missing: `make test` installs Debian's package (make redis-server)"
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server, ready = RedisServer(process, port), threading.Event()

    def read() -> None:  # the log, line by line, until the server exits (keeps the pipe drained)
        for line in process.stdout:
            server.log.append(line.rstrip())
            if READY_LINE in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(BOUND), "redis-server did not start:\n" + "\n".join(server.log)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(BOUND)
        reader.join(BOUND)
