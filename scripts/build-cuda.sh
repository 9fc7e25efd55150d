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
#      CUDACXX            nvcc, if not on PATH (the wheel's CMake config needs a CUDA toolkit,
#                         best the version the wheel was built for: torch.version.cuda)
#      CUDAHOSTCXX        the host compiler nvcc should use where it refuses the default one
#                         (e.g. g++-11 for CUDA 11.8 on a system whose g++ is 12)
#      PYTHON             python with torch (default python3)
# Then: BUILD_DIR/speed-erase erase --device cuda ...   and
#       SPEED_REQUIRE_CUDA=1 BUILD_DIR/tests/test_erase "[cuda]"   (fails, not skips, without a GPU)
# The LibTorch must use the C++11 std::string ABI, like Debian's spdlog and fmt: pip wheels for
# x86_64 do from PyTorch 2.7 on (before, only 2.6's CUDA 12.6 build); otherwise use the
# libtorch-cxx11-abi-shared-with-deps zip from pytorch.org as TORCH_PREFIX. CMakeLists.txt
# refuses an old-ABI LibTorch at configure time. The sources use only APIs common to LibTorch
# 1.13 and 2.x.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
prefix="${1:-$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')}"
build="${2:-build-cuda}"
[ -d "$prefix" ] || { echo "error: torch prefix '$prefix' does not exist" >&2; exit 2; }
cuda_ok=$("$py" -c 'import torch; print(int(torch.version.cuda is not None))' 2>/dev/null || echo "?")
[ "$cuda_ok" = "0" ] && echo "warning: this PyTorch has no CUDA (torch.version.cuda is None): the build will be CPU-only" >&2
# Only when TORCH_PREFIX was not given: then it is this python's torch.
if [ -z "${1:-}" ]; then
  abi=$("$py" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))' 2>/dev/null || echo "?")
  if [ "$abi" = "0" ]; then
    echo "error: this PyTorch ($("$py" -c 'import torch; print(torch.__version__)')) was built with the old C++ ABI; expected the C++11 ABI like Debian's libraries" >&2
    echo "hint: use PyTorch >= 2.7 from pip, or the libtorch-cxx11-abi-shared-with-deps zip from pytorch.org and pass its folder as TORCH_PREFIX" >&2
    exit 2
  fi
  want=$("$py" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
  nvcc="${CUDACXX:-$(command -v nvcc || true)}"
  have=""
  [ -n "$nvcc" ] && have=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  if [ -n "$want" ] && [ -n "$have" ] && [ "${want%%.*}" != "${have%%.*}" ]; then
    echo "warning: nvcc is CUDA $have, this PyTorch was built for CUDA $want: the configure step or the link may fail (set CUDACXX)" >&2
  fi
fi
paths="$prefix"
[ -n "${SPEED_DEPS_PREFIX:-}" ] && paths="$paths;$SPEED_DEPS_PREFIX"
# The wheel's libtorch links its own libgomp/cudart; its lib folder goes into the RUNPATH.
# SPEED_UNUSED_LIBS=OFF: the wheel's libraries name only what they use (and carry RUNPATHs of
# their own, which the unused-libs folder could not precede), so there is nothing to replace.
torch_lib="$(cd "$prefix/../.." 2>/dev/null && pwd)/lib"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$paths" \
  -DCMAKE_BUILD_RPATH="$torch_lib" -DSPEED_UNUSED_LIBS=OFF ${CUDACXX:+-DCMAKE_CUDA_COMPILER="$CUDACXX"}
ninja -C "$build" -j"$(nproc)" speed-erase test_erase test_clip test_embed test_app
"$build/speed-erase" --version
echo "built $build/speed-erase against $prefix; GPU check: SPEED_REQUIRE_CUDA=1 $build/tests/test_erase \"[cuda]\" (and test_clip), or scripts/gpu-check.sh for the whole check"
