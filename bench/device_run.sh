#!/usr/bin/env bash
# The one prepared GPU run, for the device tool (a bare H100/H200 image with Python 3.12, torch, transformers,
# accelerate, huggingface-hub, pillow, tqdm, prometheus-client; nothing else, and no network).
#
# Here, before the call:   make device-wheels        (the wheels the GPU image lacks, every one pinned to the
#                           lock, into .whl/)
# The call:                 carry [".whl", "protos/image_to_sound/v1"] (the generated stubs), timeout_s 540,
#                           command: bash bench/device_run.sh [all|audio|vlm] [--label h100] [bench flags]
# Phases (each line of the log starts with its elapsed seconds): wheels into /tmp/site (no pip download);
# card and versions; then ONE `python -m bench all` that starts the three services with the full-size
# architectures: the VLM builds its random weights on the GPU itself (--random-weights: nothing written or
# read), the audio pipeline's random checkpoint is built on the GPU and written once (2.2 GB); each model
# service checks its fast path against eager before SERVING; then the measurements, most important first,
# until the deadline (DEADLINE_S, default 420 s after the bench starts): VLM at 1 and 8 concurrent, audio
# 10 s clips at batch 1 and 8, one ImageToSound with time to first audio, then throughput and the seed
# baseline if time is left. The table comes last; bench.json, bench.log, gpu.txt, versions.txt in $OUT.
# Tiny mode, on this machine:  bash bench/device_run.sh --tiny --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
START=$SECONDS
phase() { echo "[$((SECONDS - START)) s] $*"; }
if compgen -G ".whl/*.whl" >/dev/null; then
  phase "installing $(ls .whl/*.whl | wc -l) carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD:$PWD/protos"
fi
export OUT=${OUT:-/tmp/bench-out} BENCH_CACHE=${BENCH_CACHE:-/tmp/i2s-bench} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
WHAT=all  # or a first argument audio / vlm: one service only (a variant's call)
case "${1:-}" in all|audio|vlm) WHAT=$1; shift ;; esac
case " $* " in *" --device "*) ;; *) set -- "$@" --device cuda ;; esac
# Tiny (this machine, the test suite): the same run, with the in-process engine-vs-generate comparison; full
# size: without it (it would load the 7B twice more), and a deadline that leaves room for a rerun.
case " $* " in *" --tiny "*) DEFAULT_DEADLINE=900 COMPARE="" ;; *) DEFAULT_DEADLINE=420 COMPARE=--no-engine-compare ;; esac
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch, transformers, diffusers, grpc, xgrammar; from importlib.metadata import version; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'grpc', grpc.__version__, 'xgrammar', version('xgrammar'))" | tee "$OUT/versions.txt"
phase "bench (deadline ${DEADLINE_S:-$DEFAULT_DEADLINE} s)"
"$PY" -m bench "$WHAT" $COMPARE --deadline-s "${DEADLINE_S:-$DEFAULT_DEADLINE}" --json "$OUT/bench.json" "$@" \
  2>&1 | tee "$OUT/bench.log"
phase "done"
