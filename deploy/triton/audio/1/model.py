"""Triton Python-backend model: the project's own DiffusersAudioBackend behind Triton's dynamic batcher.

Triton hands over several requests at once (from any number of service replicas); their rows are grouped
by `AudioRequest.batch_key()` (rows in one group share one pipeline call), and each request gets its rows
back in order. The tensor layout is audio_service.triton_backend's, which the service side decodes.
"""
import json
import os

import triton_python_backend_utils as pb_utils

from audio_service import triton_backend as layout
from audio_service.backend import BackendCancelled
from audio_service.diffusers_backend import DiffusersAudioBackend
from serving.models import hf_token
from serving.triton_client import instance_device, model_parameters

CHECKPOINT_ENV = "I2S_TRITON_AUDIO_CHECKPOINT"
REVISION_ENV = "I2S_TRITON_AUDIO_REVISION"  # with the checkpoint variable: what the Kubernetes pod pins


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        self.max_batch_size = max(1, int(config.get("max_batch_size", 1)))
        self.backend = DiffusersAudioBackend(
            os.environ.get(CHECKPOINT_ENV) or params["checkpoint"], device=instance_device(args),
            dtype=params.get("dtype") or None, token=hf_token(),
            revision=os.environ.get(REVISION_ENV) or params.get("revision") or None,
        )
        self.backend.load()
        self.backend.warmup()  # READY only after initialize returns: ready means warm

    def execute(self, requests):
        errors: dict[int, tuple] = {}  # request index -> (TritonError code, message)
        rows: dict[int, list] = {}
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for r, request in enumerate(requests):
            try:
                arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                          for name, _, _ in layout.INPUTS}
                rows[r] = layout.requests_from_arrays(arrays)  # AudioRequest checks itself: InvalidInput
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                errors[r] = (pb_utils.TritonError.INVALID_ARG, str(exc))
                continue
            for i, row in enumerate(rows[r]):
                groups.setdefault(row.batch_key(), []).append((r, i))

        results: dict[tuple[int, int], object] = {}
        for members in groups.values():
            for start in range(0, len(members), self.max_batch_size):
                chunk = [m for m in members[start:start + self.max_batch_size] if m[0] not in errors]
                if not chunk:
                    continue
                owners = {r for r, _ in chunk}
                # Stop when every request in this call was cancelled (its clients went away).
                should_stop = lambda owners=owners: all(requests[r].is_cancelled() for r in owners)  # noqa: E731
                try:
                    for member, result in zip(chunk, self.backend.generate([rows[r][i] for r, i in chunk],
                                                                           should_stop=should_stop)):
                        results[member] = result
                except BackendCancelled as exc:
                    for r in owners:
                        errors[r] = (pb_utils.TritonError.CANCELLED, str(exc))
                except Exception as exc:  # noqa: BLE001
                    for r in owners:
                        errors[r] = (pb_utils.TritonError.INTERNAL, f"generation failed: {exc}")

        responses = []
        for r in range(len(requests)):
            if r in errors:
                code, message = errors[r]
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)))
                continue
            arrays = layout.result_arrays([results[(r, i)] for i in range(len(rows[r]))])
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in arrays.items()]))
        return responses

    def finalize(self):
        self.backend.close()
