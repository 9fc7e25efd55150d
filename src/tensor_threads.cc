// Thread pools: LibTorch's intra-op pool (OpenMP in Debian's build) and OpenBLAS's pthread pool
// are separate, so both are sized together (build-env.md trap 6).
#include <dlfcn.h>
#include <sched.h>

#include <thread>

#include <ATen/Parallel.h>

#include "speed/error.h"
#include "speed/tensor.h"

namespace speed {

namespace {

using SetFn = void (*)(int);
using GetFn = int (*)();

// Looked up at run time: LibTorch links the system BLAS, which is OpenBLAS only when installed
// as such (libopenblas0-pthread); with the reference BLAS there is nothing to size.
SetFn blas_set() {
  static const auto f = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  return f;
}
GetFn blas_get() {
  static const auto f = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return f;
}

}  // namespace

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned h = std::thread::hardware_concurrency();
  return h > 0 ? static_cast<int>(h) : 1;
}

void set_compute_threads(int n) {
  SPEED_CHECK(n >= 1, "thread count is {}, expected >= 1", n);
  at::set_num_threads(n);
  if (SetFn f = blas_set()) f(n);
}

int blas_threads() {
  GetFn f = blas_get();
  return f ? f() : 0;
}

SerialBlas::SerialBlas() : saved_(blas_threads()) {
  if (saved_ > 1) blas_set()(1);
}

SerialBlas::~SerialBlas() {
  if (saved_ > 1) blas_set()(saved_);
}

}  // namespace speed
