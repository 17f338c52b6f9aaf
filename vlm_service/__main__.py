"""python -m vlm_service --model ID_OR_DIR --host H --port P"""
from __future__ import annotations

import asyncio
import logging

from serving.config import program_name
from serving import request_log, tracing
from serving.server import run_until_signal
from serving.startup import VLM, check_model_folder, check_ports_free, run_program
from serving.threads import apply_torch_threads
from vlm_service.config import parse_args
from vlm_service.server import build_backend, load_and_warm, make_server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vlm %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    run_program(program_name("python -m vlm_service"), lambda: serve_until_signal(config))


def serve_until_signal(config) -> None:
    # The usual mistakes (a folder typo, the two model folders swapped, a port in use) end here in one line.
    if config.backend == "transformers":
        check_model_folder(config.model, VLM)
    check_ports_free(config.server)
    apply_torch_threads(config.threads)  # before the model loads: its threads are sized by then
    request_log.configure_logging("vlm", config.server.telemetry.log_format)
    tracing.setup("vlm", config.server.telemetry)  # before any server or channel is built

    async def serve() -> None:
        backend = build_backend(config)  # cheap: loads nothing until load_and_warm
        server, servicer = make_server(config, backend)  # grpc.aio objects belong to the running loop

        async def close() -> None:
            servicer.close()
            backend.close()

        await run_until_signal(server, lambda: asyncio.to_thread(load_and_warm, backend), close)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
