"""AudioBackend that forwards to a Triton Inference Server hosting AudioLDM2 (deploy/triton/audio).

One `generate` call is one Triton request whose batch dimension holds the requests (each setting is a
per-row tensor); Triton's dynamic batcher may merge it with requests from other replicas, and the model
groups rows by `AudioRequest.batch_key()` before calling the pipeline. The tensor layout lives here and
is used by both ends (the model in deploy/triton imports it), so they cannot drift.

Progress: a Triton unary call reports nothing until it ends, so `on_step` fires once, with all steps done.
tritonclient is imported lazily.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Sequence

import numpy as np

from serving import tracing
from serving.deadline import DEFAULT_DEADLINE_SECONDS, Deadline
from serving.errors import NotReady
from serving.triton_client import (Readiness, TritonClients, TritonTls, call_timeout, model_ready,
                                   translate_error, wait_model_ready)
from audio_service.backend import (AudioBackend, AudioRequest, AudioResult, BackendCancelled,
                                   StepCallback, StopCheck, check_batch)

DEFAULT_MODEL_NAME = "audio"
# Per-row inputs of deploy/triton/audio/config.pbtxt: (name, Triton dtype, AudioRequest field).
INPUTS = (
    ("PROMPT", "BYTES", "prompt"),
    ("NEGATIVE_PROMPT", "BYTES", "negative_prompt"),
    ("DURATION_SECONDS", "FP64", "duration_seconds"),
    ("NUM_INFERENCE_STEPS", "INT32", "num_inference_steps"),
    ("GUIDANCE_SCALE", "FP64", "guidance_scale"),
    ("SEED", "INT64", "seed"),
    ("NUM_CANDIDATES", "INT32", "num_candidates"),
    ("SCHEDULER", "BYTES", "scheduler"),
)
_NUMPY = {"BYTES": np.object_, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
WAVEFORM, SAMPLE_RATE_HERTZ, SCORE, STEPS_RUN, CANDIDATE_INDEX, MODEL_ID = (
    "WAVEFORM", "SAMPLE_RATE_HERTZ", "SCORE", "STEPS_RUN", "CANDIDATE_INDEX", "MODEL_ID")
OUTPUTS = (WAVEFORM, SAMPLE_RATE_HERTZ, SCORE, STEPS_RUN, CANDIDATE_INDEX, MODEL_ID)
_STOP_POLL_SECONDS = 0.05
log = logging.getLogger(__name__)


# -- tensor layout (both ends) ----------------------------------------------------------------------

def request_arrays(requests: Sequence[AudioRequest]) -> dict[str, np.ndarray]:
    """One [batch, 1] array per setting; strings as UTF-8 bytes."""
    arrays = {}
    for name, dtype, field in INPUTS:
        values = [getattr(r, field) for r in requests]
        if dtype == "BYTES":
            values = [str(v).encode("utf-8") for v in values]
        arrays[name] = np.array(values, dtype=_NUMPY[dtype]).reshape(len(requests), 1)
    return arrays


def requests_from_arrays(arrays: dict[str, np.ndarray]) -> list[AudioRequest]:
    """The model side's inverse of request_arrays (Python numbers, the types AudioRequest checks for)."""
    rows = len(arrays[INPUTS[0][0]])
    columns = {}
    for name, dtype, field in INPUTS:
        flat = arrays[name].reshape(rows, -1)[:, 0]
        if dtype == "BYTES":
            columns[field] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
        else:
            columns[field] = [v.item() for v in flat]
    return [AudioRequest(**{field: columns[field][i] for field in columns}) for i in range(rows)]


def result_arrays(results: Sequence[AudioResult]) -> dict[str, np.ndarray]:
    """Outputs of one Triton request (its rows share the duration, hence the waveform length)."""
    return {
        WAVEFORM: np.stack([r.waveform.astype(np.float32) for r in results]),
        SAMPLE_RATE_HERTZ: np.array([[r.sample_rate_hertz] for r in results], dtype=np.int32),
        SCORE: np.array([[math.nan if r.score is None else r.score] for r in results], dtype=np.float32),
        STEPS_RUN: np.array([[r.steps_run] for r in results], dtype=np.int32),
        CANDIDATE_INDEX: np.array([[r.candidate_index] for r in results], dtype=np.int32),
        MODEL_ID: np.array([[r.model_id.encode("utf-8")] for r in results], dtype=np.object_),
    }


def results_from_arrays(arrays: dict[str, np.ndarray], requests: Sequence[AudioRequest]) -> list[AudioResult]:
    results = []
    for i, request in enumerate(requests):
        score = float(arrays[SCORE][i, 0])
        model_id = arrays[MODEL_ID][i, 0]
        results.append(AudioResult(
            waveform=np.ascontiguousarray(arrays[WAVEFORM][i], dtype=np.float32),
            sample_rate_hertz=int(arrays[SAMPLE_RATE_HERTZ][i, 0]),
            score=None if math.isnan(score) else score,
            steps_run=int(arrays[STEPS_RUN][i, 0]),
            scheduler=request.scheduler,
            model_id=model_id.decode("utf-8") if isinstance(model_id, bytes) else str(model_id),
            candidate_index=int(arrays[CANDIDATE_INDEX][i, 0]),
        ))
    return results


# -- the client side --------------------------------------------------------------------------------

class TritonAudioBackend(AudioBackend):
    """Generates clips through Triton's gRPC API; the model runs in the Triton server."""

    def __init__(self, url: str, model_name: str = DEFAULT_MODEL_NAME, *,
                 load_timeout_seconds: float = 1800.0, request_timeout_seconds: float | None = DEFAULT_DEADLINE_SECONDS,
                 readiness_ttl_seconds: float = 1.0, tls: TritonTls | None = None):
        self.url = url
        self.tls = tls or TritonTls()
        self.model_name = model_name
        self.model_id = f"triton:{model_name}"  # each result carries the checkpoint the server ran
        self.sample_rate_hertz = 16000  # AudioLDM2's; each result carries the server's
        self.load_timeout_seconds = load_timeout_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self._clients = TritonClients(url, self.tls, "audio service -> Triton")  # follows rotated TLS files
        self._loaded = False
        # The servicer asks before every request, from its event loop: reuse an answer for this long.
        self._readiness = Readiness(readiness_ttl_seconds)

    def load(self) -> None:
        wait_model_ready(self._clients.shared(), self.model_name, self.load_timeout_seconds)
        self._loaded = True

    @property
    def ready(self) -> bool:
        """Follows Triton's model readiness: an unloaded or failed model reads False."""
        if not self._loaded:
            return False
        return self._readiness.check(lambda: model_ready(self._clients.shared(), self.model_name))

    def generate(self, requests: Sequence[AudioRequest], *, should_stop: StopCheck | None = None,
                 on_step: StepCallback | None = None, deadline: Deadline | None = None) -> list[AudioResult]:
        """One Triton request for the batch; the callers' deadline is its timeout (Triton's DEADLINE_EXCEEDED,
        raised as TimeoutError), else `request_timeout_seconds`."""
        import tritonclient.grpc as triton

        check_batch(requests)
        if not self._loaded:
            raise NotReady("the Triton audio backend is not loaded")
        total = requests[0].num_inference_steps
        if should_stop is not None and should_stop():
            raise BackendCancelled(0, total)
        inputs = []
        for name, array in request_arrays(requests).items():
            tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        # The in-process stages all run inside Triton (its queue, the batch it joins, encoding, denoising,
        # decoding, CLAP scoring): from here, one stage per caller, as the in-process backend's are.
        tracing.batch_phases().enter("audio.triton_infer", model=self.model_name)
        done = threading.Event()
        outcome: dict = {}

        def finished(result, error) -> None:
            outcome.update(result=result, error=error)
            done.set()

        client = self._clients.shared()  # held until the call ends (a replaced client closes when let go)
        call = client.async_infer(
            self.model_name, inputs, finished, outputs=[triton.InferRequestedOutput(n) for n in OUTPUTS],
            client_timeout=call_timeout(deadline, self.request_timeout_seconds),
        )
        while not done.wait(_STOP_POLL_SECONDS):
            if should_stop is not None and should_stop():
                call.cancel()  # Triton sees the request cancelled; the model stops at its next step
                raise BackendCancelled(0, total)
        error = outcome["error"]
        if error is not None:
            raise translate_error(error)
        result = outcome["result"]
        results = results_from_arrays({n: result.as_numpy(n) for n in OUTPUTS}, requests)
        if on_step is not None:
            on_step(results[0].steps_run, total)
        return results

    def close(self) -> None:
        self._loaded = False
        self._clients.close()
