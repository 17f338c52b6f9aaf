"""`python -m bench --tiny --device cpu`: the GPU benchmark's own code on the tiny checkpoints, services as processes.

Asserts the harness logic (every field of the JSON, the table printed last), never the numbers' size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]

TOP_LEVEL = {"label", "mode", "what", "environment", "profile", "one_gpu_for_both", "service_args", "checkpoints",
             "startup", "vlm", "vlm_seed_sampling", "vlm_concurrent", "vlm_engine_vs_generate", "audio", "seed_audio", "e2e", "throughput", "seed_baseline",
             "peak_gpu_memory_mib", "exit_codes", "bench_seconds", "serving_paths", "skipped", "vlm_eager_step"}
VLM = {"prompt_tokens", "output_tokens", "prefill_s", "ms_per_token", "time_to_first_source_s", "wall_s"}
SEED = {"vlm_tokens", "temperature", "top_p", "vlm_s", "ddim_steps", "ddim_clip_s", "clips_per_image",
        "per_image_s", "ours_per_image_s", "ratio"}


@pytest.mark.timeout(1200)  # three services start, load and warm on 2 shared cores
def test_tiny_bench_writes_every_field_and_prints_the_table_last(tmp_path):
    # The device script itself (bench/device_run.sh), in tiny mode: the same code the GPU run executes.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable}
    done = subprocess.run(
        ["bash", "bench/device_run.sh", "--tiny", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
         "--label", "ci", "--audio-args", "--max-wait-ms 50"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "bench.json").read_text())

    assert set(out) == TOP_LEVEL
    assert out["mode"] == "tiny" and out["what"] == "all" and out["label"] == "ci"
    assert out["service_args"]["audio"][-2:] == ["--max-wait-ms", "50"]  # extra flags reach the service
    assert out["exit_codes"] == {"vlm": 0, "audio": 0, "orchestrator": 0}
    assert out["environment"]["torch"] and out["environment"]["device"] == "cpu"

    assert VLM <= set(out["vlm"]) and len(out["vlm"]["runs"]) == out["profile"]["vlm_runs"]
    assert out["vlm"]["prompt_tokens"] > 0 and out["vlm"]["ms_per_token"] > 0
    assert out["vlm"]["output_tokens"] <= out["profile"]["vlm_tokens"]  # the fixed length bounds every run
    assert VLM <= set(out["vlm_seed_sampling"])
    assert [c["clients"] for c in out["vlm_concurrent"]] == [1, 8]
    assert all(c["images_per_minute"] > 0 and c["ms_per_token"] > 0 for c in out["vlm_concurrent"])
    compared = out["vlm_engine_vs_generate"]  # in-process, one thread for both paths
    assert compared["threads"] == 1 and compared["engine"]["capture"] == "none"
    for path in ("engine", "generate"):
        assert compared[path]["ms_per_token"] > 0 and compared[path]["host_ms_per_step"]["1"] > 0
    assert compared["engine"]["host_ms_per_step"]["8"] > 0
    assert set(compared["engine"]["syncs_per_step"]) == {"1", "8"}
    assert all(n <= 1 for n in compared["engine"]["syncs_per_step"].values())

    audio = out["audio"]
    assert set(audio["per_clip_s"]) == {"1", "4", "8"} and all(v > 0 for v in audio["per_clip_s"].values())
    assert audio["realtime_factor"] > 0 and out["seed_audio"]["clip_s"] > 0

    e2e, throughput = out["e2e"], out["throughput"]
    assert {"first_audio_s", "per_image_s", "clips_done", "clips_failed"} <= set(e2e) and e2e["per_image_s"] > 0
    assert throughput["images"] == throughput["clients"] * out["profile"]["images_per_client"]
    assert throughput["images_per_minute"] > 0

    assert set(out["seed_baseline"]) == SEED and out["seed_baseline"]["ratio"] > 0
    for name in ("vlm", "audio", "orchestrator"):
        assert out["startup"][name]["serving_s"] >= out["startup"][name]["port_s"] > 0
    assert out["startup"]["audio"]["warmed_shapes"] == 1 and out["startup"]["audio"]["load_s"] is not None
    assert out["peak_gpu_memory_mib"]["source"] is None  # no nvidia-smi on a CPU machine: said, not invented

    # Each model service's path after its self-check, as its health answer said; no time ran out.
    assert out["serving_paths"] == {"vlm": {"vlm-path": "eager"}, "audio": {"audio-path": "eager"}}
    assert out["skipped"] == [] and out["vlm_eager_step"]["ms_per_token"] > 0

    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("[") and lines[-1].endswith(" s] done")  # the script's last phase line
    lines = lines[:-1]
    assert lines[-1].startswith("JSON: ")
    assert lines[-2].startswith("| bench wall time |") and "| what | measured |" in lines
