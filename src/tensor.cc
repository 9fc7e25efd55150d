// safetensors TensorInfo <-> at::Tensor.
#include "speed/tensor.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "speed/error.h"

namespace speed {

std::optional<at::ScalarType> try_scalar_type(Dtype d) {
  switch (d) {
    case Dtype::BOOL: return at::kBool;
    case Dtype::U8: return at::kByte;
    case Dtype::I8: return at::kChar;
    case Dtype::I16: return at::kShort;
    case Dtype::F16: return at::kHalf;
    case Dtype::BF16: return at::kBFloat16;
    case Dtype::I32: return at::kInt;
    case Dtype::F32: return at::kFloat;
    case Dtype::F64: return at::kDouble;
    case Dtype::I64: return at::kLong;
    // fp8 and unsigned 16/32/64-bit types need LibTorch >= 2.1 / 2.3; 1.13 has none of them.
    default: return std::nullopt;
  }
}

at::ScalarType to_scalar_type(Dtype d) {
  auto t = try_scalar_type(d);
  if (!t) fail("dtype '{}' is not supported by this LibTorch", dtype_name(d));
  return *t;
}

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool: return Dtype::BOOL;
    case at::kByte: return Dtype::U8;
    case at::kChar: return Dtype::I8;
    case at::kShort: return Dtype::I16;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    case at::kInt: return Dtype::I32;
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kLong: return Dtype::I64;
    default: fail("torch dtype '{}' has no safetensors equivalent here", t);
  }
}

bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (std::isfinite(t.sum(at::kDouble).item<double>())) return true;
  return at::isfinite(t).all().item<bool>();
}

std::string shape_string(at::IntArrayRef shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

bool is_aligned(const SafeTensors& st, const TensorInfo& info) {
  auto addr = reinterpret_cast<std::uintptr_t>(st.data(info));
  return addr % dtype_size(info.dtype) == 0;
}

namespace {

// Checks what the reader already guarantees, so a bug there cannot turn into an out-of-bounds view.
void check_span(const SafeTensors& st, const TensorInfo& info) {
  const std::uint64_t expected =
      static_cast<std::uint64_t>(info.numel()) * dtype_size(info.dtype);
  SPEED_CHECK(info.end >= info.begin && info.nbytes() == expected &&
                  st.data_start() + info.end <= st.file_size(),
              "tensor '{}' in '{}' has a byte span of {} bytes, expected {}", info.name,
              st.path(), info.nbytes(), expected);
}

at::Tensor view_impl(const SafeTensors& st, const TensorInfo& info,
                     std::shared_ptr<const SafeTensors> owner) {
  check_span(st, info);
  const auto type = to_scalar_type(info.dtype);
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);
  if (info.numel() == 0) return at::empty(info.shape, options);
  // from_blob needs a mutable pointer; the mapping is read-only and callers must not write.
  void* ptr = const_cast<std::uint8_t*>(st.data(info));
  if (is_aligned(st, info)) {
    if (owner) {
      return at::from_blob(ptr, info.shape, [keep = std::move(owner)](void*) {}, options);
    }
    return at::from_blob(ptr, info.shape, options);
  }
  auto out = at::empty(info.shape, options);
  std::memcpy(out.data_ptr(), ptr, info.nbytes());
  return out;
}

}  // namespace

at::Tensor tensor_view(std::shared_ptr<const SafeTensors> st, const TensorInfo& info) {
  SPEED_CHECK(st != nullptr, "tensor_view of '{}' without a file", info.name);
  const SafeTensors& ref = *st;
  return view_impl(ref, info, std::move(st));
}

at::Tensor tensor_view_unowned(const SafeTensors& st, const TensorInfo& info) {
  return view_impl(st, info, nullptr);
}

at::Tensor load_tensor(std::shared_ptr<const SafeTensors> st, const TensorInfo& info,
                       at::ScalarType dtype) {
  SPEED_CHECK(st != nullptr, "load_tensor of '{}' without a file", info.name);
  const auto stored = to_scalar_type(info.dtype);
  if (stored == dtype) return tensor_view(std::move(st), info);
  SPEED_CHECK(at::isFloatingType(stored) || !at::isFloatingType(dtype),
              "tensor '{}' in '{}' has dtype {}, expected a floating-point dtype", info.name,
              st->path(), dtype_name(info.dtype));
  // The unowned view lives only for the conversion, which reads the mapping directly.
  return tensor_view_unowned(*st, info).to(dtype);
}

namespace {

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const std::uint16_t* s, float* d,
                                                            std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < n; ++i) d[i] = _cvtsh_ss(s[i]);
}
bool have_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
#else
void half_to_float_f16c(const std::uint16_t*, float*, std::size_t) {}
bool have_f16c() { return false; }
#endif

}  // namespace

void widen_into(const at::Tensor& src, const at::Tensor& dst) {
  SPEED_CHECK(src.defined() && dst.defined() && src.numel() == dst.numel(),
              "widen_into: {} elements into {}", src.defined() ? src.numel() : 0,
              dst.defined() ? dst.numel() : 0);
  SPEED_CHECK(dst.is_contiguous() && dst.scalar_type() == at::kFloat && dst.device().is_cpu() &&
                  src.device().is_cpu() && at::isFloatingType(src.scalar_type()),
              "widen_into: {} on {} into {} on {}", src.scalar_type(), src.device().str(),
              dst.scalar_type(), dst.device().str());
  if (!src.is_contiguous() || (src.scalar_type() != at::kHalf && src.scalar_type() != at::kBFloat16) ||
      (src.scalar_type() == at::kHalf && !have_f16c())) {
    dst.view(src.sizes()).copy_(src);
    return;
  }
  const auto n = static_cast<std::size_t>(src.numel());
  const auto* s = static_cast<const std::uint16_t*>(src.data_ptr());
  float* d = dst.data_ptr<float>();
  const bool half = src.scalar_type() == at::kHalf;
  auto widen = [&](std::size_t i0, std::size_t i1) {
    if (half) {
      half_to_float_f16c(s + i0, d + i0, i1 - i0);
    } else {  // bfloat16 is the upper half of a float32
      for (std::size_t i = i0; i < i1; ++i) {
        const std::uint32_t bits = static_cast<std::uint32_t>(s[i]) << 16;
        std::memcpy(d + i, &bits, sizeof bits);
      }
    }
  };
  // A weight matrix (CLIP-L's are 0.6-2.4M elements) is cut into 256K-element pieces over
  // LibTorch's threads: the conversion is element by element, so the bytes never depend on it.
  constexpr std::size_t kPiece = std::size_t{1} << 18;
  const int threads = at::get_num_threads();
  if (n < 2 * kPiece || threads <= 1) {
    widen(0, n);
    return;
  }
  run_tasks((n + kPiece - 1) / kPiece, threads,
            [&](std::size_t p) { widen(p * kPiece, std::min(n, (p + 1) * kPiece)); });
}

TensorBytes tensor_bytes(std::string name, const at::Tensor& t) {
  SPEED_CHECK(t.defined(), "tensor '{}' is undefined", name);
  TensorBytes out;
  out.holder = t.device().is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous();
  out.data.name = std::move(name);
  out.data.dtype = to_dtype(out.holder.scalar_type());
  out.data.shape.assign(out.holder.sizes().begin(), out.holder.sizes().end());
  out.data.data = out.holder.data_ptr();
  out.data.nbytes = out.holder.numel() * out.holder.element_size();
  return out;
}

}  // namespace speed
