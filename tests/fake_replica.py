"""One replica of a fake model service as its own process (no model behind it, as the name says), run by the
services' real life cycle (serving.server.run_until_signal): SERVING once started, NOT_SERVING and a drain on
SIGTERM, exit 0. Its answers name the replica (description and clip `model_id`), so a test sees which
replica served an image.

    python -m tests.fake_replica --kind vision|audio --name NAME [server flags: --host, --port, --port-file, ...]
"""
from __future__ import annotations

import argparse
import asyncio
import logging

from image_to_sound.v1 import audio_pb2_grpc, vision_pb2_grpc
from serving.config import parse_config
from serving.server import GrpcServer, ServerOptions, run_until_signal
from tests.fake_services import FakeAudioServicer, FakeVisionServicer, scripted_description

KINDS = {
    "vision": ("image_to_sound.v1.VisionService", vision_pb2_grpc.add_VisionServiceServicer_to_server),
    "audio": ("image_to_sound.v1.AudioService", audio_pb2_grpc.add_AudioServiceServicer_to_server),
}


def servicer(kind: str, name: str):
    if kind == "vision":
        description = scripted_description(sources=1, variants=1)
        description.model_id = name
        return FakeVisionServicer(description=description)
    return FakeAudioServicer(model_id=name)


async def serve(kind: str, name: str, options: ServerOptions) -> None:
    service, add = KINDS[kind]
    fake = servicer(kind, name)
    server = GrpcServer(options, lambda s: add(fake, s), [service])

    async def nothing() -> None:
        return None

    await run_until_signal(server, nothing, nothing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kind", required=True, choices=sorted(KINDS))
    parser.add_argument("--name", required=True)
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(known.kind, known.name, parse_config(
        ServerOptions, rest, prefix="FAKE_REPLICA", prog="python -m tests.fake_replica", description="a fake replica")))


if __name__ == "__main__":
    main()
