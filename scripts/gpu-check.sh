#!/usr/bin/env bash
# gpu-check.sh: the whole GPU check in one command, on a machine with an NVIDIA GPU and a CUDA
# PyTorch 2.x (C++11 ABI, see build-cuda.sh): builds build-cuda/ with scripts/build-cuda.sh, runs
# the [cuda] tests (the edit and the text encoder on the GPU against the CPU; they fail, not skip,
# without a GPU), then the celebrity-100 benchmark on the GPU and, for the ratio, on this machine's
# CPU. Prints figures, never pass/fail beyond the tests'.
#
# Usage: scripts/gpu-check.sh [TORCH_PREFIX]     (default: the active python's torch)
# Env: as build-cuda.sh (PYTHON, CUDACXX, CUDAHOSTCXX, SPEED_DEPS_PREFIX) and bench.sh
#      (SPEED_BENCH_DIR: the ~2 GB synthetic checkpoint is generated there once).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== gpu-check $(date -u +%FT%TZ) on $(hostname), $(nproc) cores"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
  echo "warning: no nvidia-smi on PATH"
fi
scripts/build-cuda.sh "${1:-}" build-cuda
echo "== [cuda] tests"
SPEED_REQUIRE_CUDA=1 build-cuda/tests/test_erase "[cuda]"
SPEED_REQUIRE_CUDA=1 build-cuda/tests/test_clip "[cuda]"
echo "== celebrity-100 on the GPU (the target: <= 0.5 s end to end without the checkpoint write)"
SPEED_BENCH_NO_BUILD=1 SPEED_BENCH_DEVICE=cuda scripts/bench.sh --quick --build build-cuda base presets
echo "== the same on this machine's CPU"
SPEED_BENCH_NO_BUILD=1 SPEED_BENCH_DEVICE=cpu scripts/bench.sh --quick --build build-cuda presets
