"""python -m audio_service --model ID_OR_DIR --host H --port P"""
from __future__ import annotations

import logging

from serving.config import program_name
from serving.server import serve_model_service
from serving.startup import AUDIO, run_program
from audio_service.config import parse_args
from audio_service.server import build_backend, load_and_warm, make_server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s audio %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    run_program(program_name("python -m audio_service"), lambda: serve_model_service(
        "audio", AUDIO, config, in_process_backend="diffusers", build_backend=build_backend,
        make_server=make_server, load_and_warm=load_and_warm))


if __name__ == "__main__":
    main()
