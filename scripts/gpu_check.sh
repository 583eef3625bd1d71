#!/usr/bin/env bash
# The GPU proof kit in one command, for a machine with one NVIDIA GPU, torch,
# cuda-bindings and pytest, but no vLLM and no network (see vllm_mux/bench/gpu.py).
#
#   bash scripts/gpu_check.sh wheels     # here, with PyPI: the small wheels the kit needs, in .whl/
#   bash scripts/gpu_check.sh [ARGS...]  # there, from this repository's root: JSON and markdown in $OUT
#
# ARGS go to `python -m vllm_mux.bench.gpu` (e.g. --cycles 50 --chunk-sizes 32MiB 256MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = wheels ]; then
    # msgspec is the daemon's wire; the GPU image has everything else. Python 3.12, x86-64.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl msgspec
    ls .whl
    exit 0
fi
if ! "$PY" -c 'import msgspec' 2>/dev/null; then
    site=$(mktemp -d)  # private: a directory on PYTHONPATH must be no one else's
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m vllm_mux.bench.gpu --device cuda --out "${OUT:-gpu-check-out}" "$@"
