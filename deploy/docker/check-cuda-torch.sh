#!/bin/sh
# Does the CUDA build of the pinned torch resolve together with the lock, as the GPU images install them
# (Dockerfile, stage model-gpu)? Resolves without installing, for the images' Python (3.12) and platform.
# Needs the index pip is configured with (pip.conf, PIP_INDEX_URL: a mirror works) and PyTorch's wheel index
# of that CUDA version (or your mirror of it), given as TORCH_CUDA_INDEX, as to the image build:
#   TORCH_CUDA_INDEX=<PyTorch's wheel index of cu128> deploy/docker/check-cuda-torch.sh [cu128]
set -eu
cuda="${1:-cu128}"
: "${TORCH_CUDA_INDEX:?set TORCH_CUDA_INDEX to PyTorch's wheel index of the $cuda build (or your mirror of it)}"
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/docker/Dockerfile)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
grep -v -E '^torch==' requirements.txt > "$tmp/constraints.txt"
python3 deploy/docker/model-requirements.py pyproject.toml > "$tmp/models.txt"
python3 -m pip install --dry-run --quiet --target "$tmp/target" \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: \
    --extra-index-url "$TORCH_CUDA_INDEX" \
    "torch==$version+$cuda" -c "$tmp/constraints.txt" -r "$tmp/models.txt" "tritonclient[grpc]"
echo "torch $version+$cuda resolves with requirements.txt"
