"""python -m orchestrator --vlm H:P --audio H:P --host H --port P [--http-port P]"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile

from orchestrator.config import parse_args
from orchestrator.server import Orchestrator
from serving.config import program_name
from serving.server import run_until_signal
from serving.startup import check_port_free, prepare_process, run_program


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    run_program(program_name("python -m orchestrator"), lambda: serve_until_signal(config))


def serve_until_signal(config) -> None:
    prepare_process("orchestrator", config.server)
    check_port_free(config.server.host, config.http.http_port, "--http-port")

    async def serve() -> None:
        orchestrator = Orchestrator(config)
        front = folder = None
        if config.http.http_port >= 0:
            from gateway.front import HttpFront

            # The HTTP front calls the gRPC server itself, through a Unix socket only this process can open
            # (a private folder), so every HTTP call passes the same interceptors and servicer.
            folder = tempfile.mkdtemp(prefix="i2s-orchestrator-")
            socket_path = os.path.join(folder, "grpc.sock")
            orchestrator.server.server.add_insecure_port(f"unix:{socket_path}")
            front = HttpFront(config.http, config.server, f"unix:{socket_path}")
            await front.start()
        try:
            # SERVING once both model services are SERVING: a readiness probe then means "can do the job".
            await run_until_signal(orchestrator.server, orchestrator.wait_for_backends, orchestrator.close)
        finally:
            # After the gRPC drain, so HTTP calls in flight finished through it (or got its refusal).
            if front is not None:
                await front.stop()
                shutil.rmtree(folder, ignore_errors=True)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
