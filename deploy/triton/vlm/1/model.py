"""Triton Python-backend model: the project's own TransformersVisionBackend with its decode engine, decoupled.

Each request gets one response per stream event (encoded by vlm_service.triton_backend, which the
service side decodes), then a final empty response. `execute` hands every request to a thread of its own
and returns: the requests in flight decode together in the backend's engine (batched steps, as in the
VLM service), up to `engine_max_batch` at once, `max_queue` more waiting. The project must be importable in
Triton's Python environment (`pip install .` there; see deploy/README.md).
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from serving.triton_client import instance_device, model_parameters
from vlm_service import triton_backend as wire
from vlm_service.config import VlmConfig, parse_args
from vlm_service.transformers_backend import TransformersVisionBackend

CHECKPOINT_ENV = "I2S_TRITON_VLM_CHECKPOINT"
REVISION_ENV = "I2S_TRITON_VLM_REVISION"  # with the checkpoint variable: what the Kubernetes pod pins


def vlm_config(params: dict[str, str], device: str) -> VlmConfig:
    """The VLM service's own configuration (vlm_service.config: its defaults, its I2S_VLM_* variables)
    with this model's config.pbtxt parameters as its flags: `checkpoint` is --model, "" keeps the default."""
    params = {**params, "checkpoint": os.environ.get(CHECKPOINT_ENV) or params.get("checkpoint", ""),
              "revision": os.environ.get(REVISION_ENV) or params.get("revision", "")}
    argv = ["--device", device]
    for key, value in params.items():
        if value:
            argv += ["--model" if key == "checkpoint" else f"--{key.replace('_', '-')}", value]
    return parse_args(argv)


class TritonPythonModel:
    def initialize(self, args):
        config = vlm_config(model_parameters(json.loads(args["model_config"])), instance_device(args))
        self.backend = TransformersVisionBackend.from_config(config)
        self.backend.load()
        self.backend.warmup()  # Triton says READY only after initialize returns: ready means warm
        # A thread per request in flight: each blocks on its stream while the engine decodes them together.
        self.streams = ThreadPoolExecutor(max_workers=config.engine_max_batch + config.max_queue,
                                          thread_name_prefix="vlm-stream")
        pb_utils.Logger.log_info(f"vlm: decode engine, up to {config.engine_max_batch} requests decoded together, "
                                 f"{config.max_queue} waiting")

    def execute(self, requests):
        # Decoupled: responses go through each request's sender, from its thread, after execute returns; the
        # inputs are read here, while the request is certainly alive.
        for request in requests:
            arrays = {name: _input(request, name)
                      for name in (wire.IMAGE, wire.MAX_NEW_TOKENS, wire.TEMPERATURE, wire.TOP_P, wire.SEED,
                                   wire.LOCATE_SOURCES, wire.PRIORITY)}
            self.streams.submit(self._serve, arrays, request.get_response_sender())
        return None

    def _serve(self, arrays, sender):
        def respond(kind: bytes, payload: bytes) -> None:
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(wire.EVENT_KIND, _bytes_tensor(kind)), pb_utils.Tensor(wire.EVENT, _bytes_tensor(payload)),
            ]))

        try:
            from PIL import Image

            image = Image.fromarray(arrays[wire.IMAGE])  # uint8 (H, W, 3): RGB
            # A cancelled request (the client stopped its stream) stops generation at the next token.
            for event in self.backend.stream(image, wire.options_from_arrays(arrays), sender.is_cancelled,
                                             priority=wire.priority_from_arrays(arrays)):
                if sender.is_cancelled():
                    break
                respond(*wire.encode_event(event))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client, typed
            if not sender.is_cancelled():
                respond(*wire.encode_error(exc))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.streams.shutdown(wait=True, cancel_futures=False)  # streams in flight end first
        self.backend.close()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _bytes_tensor(value: bytes):
    import numpy as np

    return np.array([value], dtype=np.object_)
