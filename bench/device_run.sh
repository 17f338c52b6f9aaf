#!/usr/bin/env bash
# The one prepared GPU run, for the device tool (a bare H100/H200 image with Python 3.12, torch, transformers,
# accelerate, huggingface-hub, pillow, tqdm, prometheus-client; nothing else, and no network).
#
# Here, before the call:   make device-wheels        (the wheels the GPU image lacks, into .whl/)
# The call:                 carry [".whl", "protos/image_to_sound/v1"] (the generated stubs), command:
#                           bash bench/device_run.sh [bench arguments, e.g. audio --label h100]
# It installs the wheels into /tmp/site, runs `python -m bench --device cuda` from this checkout (the
# project is not pip-installed there: the checkout and its carried stubs are put on the path for this
# run only), and leaves bench.json and the log in $OUT. With --tiny --device cpu it runs here too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD:$PWD/protos"
fi
export OUT=${OUT:-/tmp/bench-out} BENCH_CACHE=${BENCH_CACHE:-/tmp/i2s-bench} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ "$*" = "" ]; then set -- --device cuda; fi
case " $* " in *" --device "*) ;; *) set -- "$@" --device cuda ;; esac
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, diffusers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'grpc', grpc.__version__)" | tee "$OUT/versions.txt"
set -o pipefail
"$PY" -m bench "$@" 2>&1 | tee "$OUT/bench.log"
