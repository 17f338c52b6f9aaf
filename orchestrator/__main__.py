"""python -m orchestrator --vlm H:P --audio H:P --host H --port P"""
from __future__ import annotations

import asyncio
import logging

from orchestrator.config import parse_args
from orchestrator.server import Orchestrator
from serving.config import program_name
from serving.server import run_until_signal
from serving.startup import check_ports_free, run_program


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    run_program(program_name("python -m orchestrator"), lambda: serve_until_signal(config))


def serve_until_signal(config) -> None:
    check_ports_free(config.server)

    async def serve() -> None:
        orchestrator = Orchestrator(config)
        # SERVING once both model services are SERVING: a readiness probe then means "can do the job".
        await run_until_signal(orchestrator.server, orchestrator.wait_for_backends, orchestrator.close)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
