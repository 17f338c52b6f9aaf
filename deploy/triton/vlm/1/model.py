"""Triton Python-backend model: the project's own TransformersVisionBackend, decoupled.

Each request gets one response per stream event (encoded by vlm_service.triton_backend, which the
service side decodes), then a final empty response. The project must be importable in Triton's Python
environment (`pip install .` there; see deploy/README.md).
"""
import json
import os

import triton_python_backend_utils as pb_utils

from serving.models import hf_token
from serving.triton_client import instance_device, model_parameters
from vlm_service import triton_backend as wire
from vlm_service.transformers_backend import TransformersVisionBackend

CHECKPOINT_ENV = "I2S_TRITON_VLM_CHECKPOINT"
REVISION_ENV = "I2S_TRITON_VLM_REVISION"  # with the checkpoint variable: what the Kubernetes pod pins


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(json.loads(args["model_config"]))
        kwargs = dict(revision=os.environ.get(REVISION_ENV) or params.get("revision") or None, token=hf_token(),
                      device=instance_device(args),
                      dtype=params.get("dtype") or None, prompt_version=params.get("prompt_version") or "v1")
        if params.get("max_pixels"):
            kwargs["max_pixels"] = int(params["max_pixels"])
        self.backend = TransformersVisionBackend(os.environ.get(CHECKPOINT_ENV) or params["checkpoint"], **kwargs)
        self.backend.load()
        self.backend.warmup()  # Triton says READY only after initialize returns: ready means warm

    def execute(self, requests):
        # One request at a time on this instance's thread: one model, one device, one generate.
        for request in requests:
            self._serve(request, request.get_response_sender())
        return None  # decoupled: everything went through the response senders

    def _serve(self, request, sender):
        def respond(kind: bytes, payload: bytes) -> None:
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(wire.EVENT_KIND, _bytes_tensor(kind)), pb_utils.Tensor(wire.EVENT, _bytes_tensor(payload)),
            ]))

        try:
            from PIL import Image

            arrays = {name: _input(request, name)
                      for name in (wire.IMAGE, wire.MAX_NEW_TOKENS, wire.TEMPERATURE, wire.TOP_P, wire.SEED)}
            image = Image.fromarray(arrays[wire.IMAGE])  # uint8 (H, W, 3): RGB
            # A cancelled request (the client stopped its stream) stops generation at the next token.
            for event in self.backend.stream(image, wire.options_from_arrays(arrays), sender.is_cancelled):
                if sender.is_cancelled():
                    break
                respond(*wire.encode_event(event))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client, typed
            if not sender.is_cancelled():
                respond(*wire.encode_error(exc))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.backend.close()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _bytes_tensor(value: bytes):
    import numpy as np

    return np.array([value], dtype=np.object_)
