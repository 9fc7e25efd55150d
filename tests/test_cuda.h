// [cuda] tests: whether a GPU is there to test on. Without one a [cuda] case passes with a visible
// warning (the CPU-only Debian build), or fails when SPEED_REQUIRE_CUDA=1 (scripts/gpu-check.sh
// and the GPU check scripts/build-cuda.sh prints set it), so that a broken CUDA set-up cannot
// pass as a skip.
#pragma once

#include <torch/cuda.h>

#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>

namespace speed::test {

inline bool cuda_or_skip() {
  if (torch::cuda::is_available()) return true;
  const char* require = std::getenv("SPEED_REQUIRE_CUDA");
  if (require && std::strcmp(require, "1") == 0)
    FAIL("SPEED_REQUIRE_CUDA=1 but LibTorch sees no CUDA GPU (a CPU-only LibTorch, no driver, "
         "or CUDA_VISIBLE_DEVICES hides it)");
  WARN("SKIPPED: LibTorch sees no CUDA GPU (build with scripts/build-cuda.sh on a GPU machine)");
  return false;
}

}  // namespace speed::test
