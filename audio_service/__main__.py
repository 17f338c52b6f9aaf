"""python -m audio_service --model ID_OR_DIR --host H --port P"""
from __future__ import annotations

import asyncio
import logging

from audio_service.config import parse_args
from audio_service.server import build_backend, load_and_warm, make_server
from serving import request_log, tracing
from serving.server import run_until_signal


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s audio %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    request_log.configure_logging("audio", config.server.telemetry.log_format)
    tracing.setup("audio", config.server.telemetry)  # before any server or channel is built

    async def serve() -> None:
        backend = build_backend(config)  # cheap: loads nothing until load_and_warm
        server, servicer = make_server(config, backend)  # grpc.aio objects belong to the running loop

        async def close() -> None:
            await servicer.close()
            backend.close()

        await run_until_signal(server, lambda: asyncio.to_thread(load_and_warm, backend), close)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
