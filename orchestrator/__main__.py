"""python -m orchestrator --vlm H:P --audio H:P --host H --port P"""
from __future__ import annotations

import asyncio
import logging

from orchestrator.config import parse_args
from orchestrator.server import Orchestrator
from serving import request_log, tracing
from serving.server import run_until_signal


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    request_log.configure_logging("orchestrator", config.server.telemetry.log_format)
    tracing.setup("orchestrator", config.server.telemetry)  # before any server or channel is built

    async def serve() -> None:
        orchestrator = Orchestrator(config)
        # SERVING once both model services are SERVING: a readiness probe then means "can do the job".
        await run_until_signal(orchestrator.server, orchestrator.wait_for_backends, orchestrator.close)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
