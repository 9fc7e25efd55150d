#!/usr/bin/env bash
# build-cuda.sh: builds speed-erase against a CUDA LibTorch 2.x, e.g. the one inside a pip
# PyTorch wheel, so that --device cuda|auto runs the encoder and the per-layer math on the GPU.
#
# Usage: scripts/build-cuda.sh [TORCH_PREFIX] [BUILD_DIR]
#   TORCH_PREFIX  folder holding TorchConfig.cmake's prefix; default: the active python's
#                 `python3 -c 'import torch; print(torch.utils.cmake_prefix_path)'`
#   BUILD_DIR     default build-cuda
# Env: SPEED_DEPS_PREFIX  extra CMAKE_PREFIX_PATH entries (';'-separated) for spdlog/fmt/CLI11/
#                         nlohmann_json/Eigen/Catch2 unpacked from their Debian .deb files on a
#                         machine without package access (dpkg-deb -x PKG.deb PREFIX)
#      CUDACXX            nvcc, if not on PATH (the wheel's CMake config needs a CUDA toolkit)
#      PYTHON             python with torch (default python3)
# Then: BUILD_DIR/speed-erase erase --device cuda ...   and   BUILD_DIR/tests/test_erase "[cuda]"
# The wheel uses the C++11 ABI like Debian's libraries; the sources use only APIs common to
# LibTorch 1.13 and 2.x.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
prefix="${1:-$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')}"
build="${2:-build-cuda}"
[ -d "$prefix" ] || { echo "error: torch prefix '$prefix' does not exist" >&2; exit 2; }
cuda_ok=$("$py" -c 'import torch; print(int(torch.version.cuda is not None))' 2>/dev/null || echo "?")
[ "$cuda_ok" = "0" ] && echo "warning: this PyTorch has no CUDA (torch.version.cuda is None): the build will be CPU-only" >&2
paths="$prefix"
[ -n "${SPEED_DEPS_PREFIX:-}" ] && paths="$paths;$SPEED_DEPS_PREFIX"
# The wheel's libtorch links its own libgomp/cudart; its lib folder goes into the RUNPATH.
# SPEED_UNUSED_LIBS=OFF: the wheel's libraries name only what they use (and carry RUNPATHs of
# their own, which the unused-libs folder could not precede), so there is nothing to replace.
torch_lib="$(cd "$prefix/../.." 2>/dev/null && pwd)/lib"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$paths" \
  -DCMAKE_BUILD_RPATH="$torch_lib" -DSPEED_UNUSED_LIBS=OFF ${CUDACXX:+-DCMAKE_CUDA_COMPILER="$CUDACXX"}
ninja -C "$build" -j"$(nproc)" speed-erase test_erase test_embed test_app
"$build/speed-erase" --version
echo "built $build/speed-erase against $prefix; GPU check: $build/tests/test_erase \"[cuda]\""
