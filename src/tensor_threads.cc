// Thread pools: LibTorch's intra-op pool (OpenMP in Debian's build) and OpenBLAS's pthread pool
// are separate (build-env.md trap 6): LibTorch's is sized to the request, OpenBLAS's to 1, and
// dense() splits the encoder's matrix products over threads of its own instead.
#include <dlfcn.h>
#include <sched.h>

#include <atomic>
#include <exception>
#include <limits>
#include <thread>
#include <vector>

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include "speed/error.h"
#include "speed/tensor.h"

namespace speed {

namespace {

using SetFn = void (*)(int);
using GetFn = int (*)();
// Fortran BLAS sgemm (column-major; the hidden string lengths are not read by OpenBLAS, and
// LibTorch calls it the same way).
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);

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
using DsyrkFn = void (*)(const char*, const char*, const int*, const int*, const double*,
                         const double*, const int*, const double*, double*, const int*);
DsyrkFn blas_dsyrk() {
  static const auto f =
      blas_set() ? reinterpret_cast<DsyrkFn>(dlsym(RTLD_DEFAULT, "dsyrk_")) : nullptr;
  return f;
}
// The BLAS routines are called directly only from OpenBLAS, whose pool set_compute_threads keeps
// at 1 thread: another BLAS (MKL in a pip LibTorch) may thread inside each call, and its results
// are not promised to be independent of how the rows are split. Then at:: ops are used.
SgemmFn blas_sgemm() {
  static const auto f =
      blas_set() ? reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_")) : nullptr;
  return f;
}

}  // namespace

void exact_float32_matmul(const at::Device& device) {
  if (device.is_cuda()) at::globalContext().setAllowTF32CuBLAS(false);
}

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
  if (SetFn f = blas_set()) f(1);
}

std::string blas_core() {
  using NameFn = const char* (*)();
  static const auto f =
      blas_set() ? reinterpret_cast<NameFn>(dlsym(RTLD_DEFAULT, "openblas_get_corename")) : nullptr;
  const char* name = f ? f() : nullptr;
  return name ? name : "";
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

void run_tasks(std::size_t n, int threads, const std::function<void(std::size_t)>& fn) {
  const std::size_t workers = std::min(n, static_cast<std::size_t>(std::max(threads, 1)));
  if (workers <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::vector<std::exception_ptr> errors(n);
  auto work = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      try {
        fn(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  // A new thread starts with OpenMP's and MKL's default pool sizes (both per thread), not the one
  // set_compute_threads() or edit_layers() gave the caller's: LibTorch's parallel_for catches up
  // lazily, but a LAPACK call from MKL (a pip LibTorch's BLAS) would run on every core, inside
  // threads that are already parallel, with bytes that depend on which thread got which task.
  // Only where the BLAS is not OpenBLAS (whose pool is process-wide and kept at 1): init_num_threads
  // goes through set_num_threads, which in LibTorch 1.13 also rebuilds its pthreadpool (a thread
  // started and one joined) and clears oneDNN's cache, on every call.
  const bool per_thread_blas = blas_set() == nullptr;
  auto worker = [&] {
    if (per_thread_blas) at::init_num_threads();
    work();
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  try {
    for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(worker);
  } catch (...) {  // no thread to be had: the caller does the rest
  }
  work();
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  // Blocks of output columns (rows of w) start at multiples of kAlign: the BLAS computes in tiles
  // of a few rows of its first operand (4 to 16 in OpenBLAS's kernels), so whole tiles keep every
  // block on the fast kernels. Alignment alone does not make the bytes independent of the split
  // (see below); a split fixed by N does.
  constexpr std::int64_t kAlign = 64;
  const SgemmFn sgemm = blas_sgemm();
  constexpr auto kMax = static_cast<std::int64_t>(std::numeric_limits<int>::max());
  if (!sgemm || x.dim() != 2 || w.dim() != 2 || !b.defined() || b.dim() != 1 ||
      !x.device().is_cpu() || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || !w.device().is_cpu() || !b.device().is_cpu() ||
      x.size(1) != w.size(1) || b.size(0) != w.size(0) || x.size(0) > kMax || w.numel() > kMax ||
      x.size(0) * w.size(0) > kMax || x.size(0) * x.size(1) > kMax)
    return at::linear(x, w, b);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)),
            N = static_cast<int>(w.size(0));
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int r = 0; r < M; ++r) std::copy(bp, bp + N, op + static_cast<std::ptrdiff_t>(r) * N);
  // The output columns are split, not the rows: each call then packs only its own slice of w (the
  // large operand) and all of x (the small one). Split by rows, every call packed all of w again:
  // 12 times w per product, ~8 % of a cold celebrity-100 run's CPU time (seventh session).
  // The split depends on N only, never on the thread count: OpenBLAS picks its kernel by the CPU
  // and by the call's size (on AVX-512 machines, a small-matrix path with another summation
  // order), so equal blocks are the only way to equal bytes for any --threads. Up to kBlocks
  // blocks (12 divides evenly over 1, 2, 3, 4 or 6 threads), each one sgemm call.
  constexpr std::int64_t kBlocks = 12;
  const std::int64_t tiles = (N + kAlign - 1) / kAlign;
  const std::int64_t blocks = std::max<std::int64_t>(1, std::min<std::int64_t>(kBlocks, tiles));
  auto start = [&](std::int64_t p) {  // first column of block p
    return static_cast<int>(std::min<std::int64_t>(N, tiles * p / blocks * kAlign));
  };
  const int threads = std::max(at::get_num_threads(), 1);
  run_tasks(static_cast<std::size_t>(blocks), threads, [&](std::size_t p) {
    const int c0 = start(static_cast<std::int64_t>(p));
    const int cols = start(static_cast<std::int64_t>(p) + 1) - c0;
    if (cols <= 0) return;
    // Row-major out [M, N] is column-major outᵀ [N, M] (ld N); columns c0.. of out are rows c0..
    // of outᵀ: outᵀ[c0:c0+cols, :] = w[c0:c0+cols, :] xᵀ + outᵀ[c0:c0+cols, :].
    const float one = 1.0f;
    sgemm("T", "N", &cols, &M, &K, &one, wp + static_cast<std::ptrdiff_t>(c0) * K, &K, xp, &K,
          &one, op + c0, &N);
  });
  return out;
}

at::Tensor gram(const at::Tensor& W, bool of_columns) {
  const DsyrkFn syrk = blas_dsyrk();
  constexpr auto kMax = static_cast<std::int64_t>(std::numeric_limits<int>::max());
  if (!syrk || W.dim() != 2 || !W.device().is_cpu() || W.scalar_type() != at::kDouble ||
      W.numel() > kMax || W.numel() == 0)
    return of_columns ? at::matmul(W.t(), W) : at::matmul(W, W.t());
  const at::Tensor A = W.contiguous();
  // Row-major W [r, c] is column-major Wᵀ [c, r] (lda c): "N" gives Wᵀ W, "T" gives W Wᵀ.
  const int r = static_cast<int>(A.size(0)), c = static_cast<int>(A.size(1));
  const int n = of_columns ? c : r, k = of_columns ? r : c;
  at::Tensor G = at::empty({n, n}, A.options());
  const double one = 1.0, zero = 0.0;
  syrk("U", of_columns ? "N" : "T", &n, &k, &one, A.data_ptr<double>(), &c, &zero,
       G.data_ptr<double>(), &n);
  // Column-major upper = row-major lower triangle: mirror it into the upper one.
  double* g = G.data_ptr<double>();
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) g[static_cast<std::ptrdiff_t>(i) * n + j] = g[static_cast<std::ptrdiff_t>(j) * n + i];
  return G;
}

}  // namespace speed
