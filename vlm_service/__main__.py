"""python -m vlm_service --model ID_OR_DIR --host H --port P"""
from __future__ import annotations

import asyncio
import logging

from serving.server import run_until_signal
from vlm_service.config import parse_args
from vlm_service.server import build_backend, load_and_warm, make_server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vlm %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    backend = build_backend(config)
    server, servicer = make_server(config, backend)

    async def close() -> None:
        servicer.close()
        backend.close()

    asyncio.run(run_until_signal(server, lambda: asyncio.to_thread(load_and_warm, backend), close))


if __name__ == "__main__":
    main()
