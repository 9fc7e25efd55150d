// speed/tensor.h: safetensors tensors <-> at::Tensor, a fast 64-bit hash, fmt formatters for
// torch types (build-env.md trap 5).
//
// Views over a mapped file are zero-copy when the data is aligned to its element size (the
// reference writer guarantees this; older files may not) and a copy otherwise. Mapped memory is
// read-only: never modify a view in place (clone first).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ostream.h>

#include "speed/safetensors.h"

namespace speed {

// Dtype <-> torch scalar type. Throws for dtypes this LibTorch cannot hold (F8_*, U16/U32/U64).
at::ScalarType to_scalar_type(Dtype d);
std::optional<at::ScalarType> try_scalar_type(Dtype d);
// Throws for torch types safetensors cannot name here (complex, quantized, ...).
Dtype to_dtype(at::ScalarType t);

// A CPU tensor of the stored dtype and shape over `info`'s bytes in `st`. Zero-copy when
// aligned: the tensor then keeps `st` alive. Otherwise the bytes are copied once.
at::Tensor tensor_view(std::shared_ptr<const SafeTensors> st, const TensorInfo& info);
// Same, but the caller guarantees `st` outlives the tensor (no ownership is taken).
at::Tensor tensor_view_unowned(const SafeTensors& st, const TensorInfo& info);
// True when tensor_view of `info` will be zero-copy.
bool is_aligned(const SafeTensors& st, const TensorInfo& info);

// The tensor as `dtype` (a floating type), in one conversion from the stored bytes: a widening
// F16/BF16 -> F32/F64 reads the mapping directly (no intermediate copy); the same dtype gives the
// zero-copy view itself (read-only!). Integer or bool sources are refused for floating targets.
at::Tensor load_tensor(std::shared_ptr<const SafeTensors> st, const TensorInfo& info,
                       at::ScalarType dtype);

// Copies the floating CPU tensor `src` into the contiguous float32 CPU tensor `dst` of as many
// elements (row-major order): F16 by the CPU's F16C instructions where it has them (~10x
// LibTorch's copy_), BF16 by a shift, anything else by copy_. Every conversion is exact. For
// weights widened just before use into one reused buffer (the text encoder's layers): fresh
// memory costs more than the conversion (docs/performance.md, "Seventh session").
void widen_into(const at::Tensor& src, const at::Tensor& dst);

// A tensor ready for write_safetensors: `holder` keeps a contiguous CPU copy (or the tensor
// itself when already contiguous on the CPU) alive as long as `data` is used.
struct TensorBytes {
  at::Tensor holder;
  TensorData data;
};
TensorBytes tensor_bytes(std::string name, const at::Tensor& t);

// Whether every element of a floating tensor is finite. One float64 sum (NaN and ±Inf
// propagate, finite half/bfloat16/float32 values cannot overflow it) instead of LibTorch's
// composite isfinite, which costs ~20 ms per 1M half elements; exact isfinite only when the sum
// is not finite (an overflow of huge float64 values is not a false alarm).
bool all_finite(const at::Tensor& t);

// XXH64 (the xxHash 64-bit algorithm, bit-exact) of a byte range: ~GB/s per core.
std::uint64_t hash64(const void* data, std::size_t n, std::uint64_t seed = 0);
// Combines hashes in order (not commutative): h = hash64(previous || value).
std::uint64_t hash_combine(std::uint64_t h, std::uint64_t value);
std::string hex64(std::uint64_t h);  // 16 lower-case hex digits

// On a CUDA device: float32 matrix products in full float32 (no TF32), whatever the environment
// asked for (LibTorch 2.x starts with TF32 when TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set, as in
// NVIDIA's containers). No-op on the CPU. Process-wide.
void exact_float32_matmul(const at::Device& device);

// ---- threads (build-env.md trap 6) ----
// CPU cores this process may run on (sched_getaffinity; at least 1).
int available_cores();
// Sets LibTorch's intra-op pool to n >= 1 and OpenBLAS's own pool (openblas_set_num_threads,
// looked up with dlsym: absent with another BLAS) to 1: parallel work is split by the callers
// (dense() below, the edit's layers), never by the BLAS. OpenBLAS's idle workers spin with
// sched_yield for ~0.1 s after every call and would take a core from LibTorch's own threads
// (measured: ~0.9 s of CPU in a 2 s celebrity-100 run on 2 cores).
void set_compute_threads(int n);
// OpenBLAS's pool size, 0 when the BLAS is not OpenBLAS.
int blas_threads();
// The processor kernels OpenBLAS runs ("Haswell", "SkylakeX", ...: openblas_get_corename; it
// follows OPENBLAS_CORETYPE when that is set), empty when the BLAS is not OpenBLAS.
std::string blas_core();
// While alive, OpenBLAS runs single-threaded (for work that is already parallel over layers:
// nested pools on few cores only oversubscribe); restores the previous size.
class SerialBlas {
 public:
  SerialBlas();
  ~SerialBlas();
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int saved_ = 0;
};

// Runs fn(0) .. fn(n - 1) on up to `threads` threads (the caller's included; std::threads, as
// the inline at::parallel_for is serial in code not built with -fopenmp), handing out indices in
// order. On one thread the first error ends the loop; on several, every task runs and the first
// error in index order is rethrown.
void run_tasks(std::size_t n, int threads, const std::function<void(std::size_t)>& fn);

// x wᵀ + b (at::linear) for float32 x [M, in] on the CPU, by OpenBLAS's sgemm directly (found
// with dlsym): the output columns (rows of w) are cut into up to 12 blocks fixed by w's size,
// handed out over LibTorch's thread count (at::get_num_threads()), each block one
// single-threaded call (see set_compute_threads). The blocks do not depend on the thread count,
// so neither do the bytes (tested). Other dtypes or devices, or a BLAS other than OpenBLAS:
// at::linear.
at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// The Gram matrix of a float64 matrix W [r, c]: Wᵀ W [c, c] when `of_columns`, else W Wᵀ [r, r].
// On the CPU by OpenBLAS's dsyrk (one triangle: half the products of a matrix product, then
// mirrored, so the result is exactly symmetric); elsewhere, or with another BLAS, at::matmul.
at::Tensor gram(const at::Tensor& W, bool of_columns);

// "[768, 512]" (the message grammar's shape form).
std::string shape_string(at::IntArrayRef shape);

}  // namespace speed

// fmt 9 cannot format torch types by itself.
template <>
struct fmt::formatter<at::Tensor> : fmt::ostream_formatter {};
template <>
struct fmt::formatter<c10::ScalarType> : fmt::ostream_formatter {};
template <>
struct fmt::formatter<c10::IntArrayRef> : fmt::formatter<std::string> {
  template <typename FormatContext>
  auto format(c10::IntArrayRef shape, FormatContext& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string>::format(speed::shape_string(shape), ctx);
  }
};
