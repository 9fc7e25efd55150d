// tensor module: safetensors <-> at::Tensor views, widening, bytes for writing, XXH64, fmt.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "speed/error.h"
#include "speed/tensor.h"

using namespace speed;

namespace {

std::string u64le(std::uint64_t v) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &v, 8);
  return s;
}

// A file from a literal header (no padding: lets a test misalign the data) and data bytes.
std::shared_ptr<const SafeTensors> raw_file(const std::string& header, const std::string& data) {
  return std::make_shared<const SafeTensors>(
      SafeTensors::from_memory(u64le(header.size()) + header + data, "raw"));
}

std::string bytes_of(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

}  // namespace

TEST_CASE("dtype mapping round-trips and refuses what this LibTorch lacks", "[unit]") {
  for (Dtype d : {Dtype::BOOL, Dtype::U8, Dtype::I8, Dtype::I16, Dtype::F16, Dtype::BF16,
                  Dtype::I32, Dtype::F32, Dtype::F64, Dtype::I64}) {
    CHECK(to_dtype(to_scalar_type(d)) == d);
    CHECK(at::elementSize(to_scalar_type(d)) == dtype_size(d));
  }
  CHECK_FALSE(try_scalar_type(Dtype::F8_E4M3).has_value());
  CHECK_THROWS_WITH(to_scalar_type(Dtype::U32), Catch::Contains("'U32' is not supported"));
  CHECK_THROWS_AS(to_dtype(at::kComplexFloat), Error);
}

TEST_CASE("aligned views are zero-copy, unaligned ones are copied", "[unit]") {
  at::Tensor w = at::arange(6, at::kFloat).view({2, 3});
  at::Tensor h = at::tensor({1.5, -2.25, 65504.0, 6.1035156e-05}, at::kFloat).to(at::kHalf);
  const auto wb = tensor_bytes("w", w), hb = tensor_bytes("h", h);
  const std::string header = make_header({wb.data, hb.data}, {});
  const std::string file = u64le(header.size()) + header + bytes_of(w) + bytes_of(h);
  auto st = std::make_shared<const SafeTensors>(SafeTensors::from_memory(file, "mem"));
  const TensorInfo& wi = st->at("w");
  REQUIRE(is_aligned(*st, wi));
  at::Tensor v = tensor_view(st, wi);
  CHECK(v.data_ptr() == static_cast<const void*>(st->data(wi)));
  CHECK(v.sizes() == w.sizes());
  CHECK(at::equal(v, w));

  // The view keeps the file alive after the last other owner goes.
  std::weak_ptr<const SafeTensors> weak = st;
  st.reset();
  CHECK_FALSE(weak.expired());
  CHECK(at::equal(v, w));
  v = at::Tensor();
  CHECK(weak.expired());

  // U8 [1] first puts the F32 data at an odd address: copied, same values.
  const std::string hdr =
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  at::Tensor b2 = at::tensor({3.5f, -1.0f});
  auto raw = raw_file(hdr, std::string(1, '\x07') + bytes_of(b2));
  const TensorInfo& bi = raw->at("b");
  CHECK_FALSE(is_aligned(*raw, bi));
  at::Tensor bv = tensor_view(raw, bi);
  CHECK(bv.data_ptr() != static_cast<const void*>(raw->data(bi)));
  CHECK(at::equal(bv, b2));
  CHECK(tensor_view(raw, raw->at("a")).item<std::uint8_t>() == 7);
}

TEST_CASE("widening F16/BF16 is exact and reads the mapping directly", "[unit]") {
  at::Tensor src = at::tensor({1.5, -2.25, 65504.0, 6.103515625e-05, 0.0009765625}, at::kDouble);
  at::Tensor h = src.to(at::kHalf), bf = src.to(at::kBFloat16);
  at::Tensor i = at::tensor({1, 2}, at::kLong);
  const auto hb = tensor_bytes("h", h), bb = tensor_bytes("bf", bf), ib = tensor_bytes("i", i);
  const std::string header = make_header({hb.data, bb.data, ib.data}, {});
  auto st = std::make_shared<const SafeTensors>(SafeTensors::from_memory(
      u64le(header.size()) + header + bytes_of(h) + bytes_of(bf) + bytes_of(i), "mem"));
  at::Tensor h32 = load_tensor(st, st->at("h"), at::kFloat);
  CHECK(h32.scalar_type() == at::kFloat);
  CHECK(at::equal(h32, h.to(at::kFloat)));
  CHECK(at::equal(load_tensor(st, st->at("h"), at::kDouble), src));  // all exactly representable
  at::Tensor b64 = load_tensor(st, st->at("bf"), at::kDouble);
  CHECK(at::equal(b64, bf.to(at::kDouble)));
  // Same dtype: the zero-copy view itself.
  at::Tensor same = load_tensor(st, st->at("h"), at::kHalf);
  CHECK(same.data_ptr() == static_cast<const void*>(st->data(st->at("h"))));
  CHECK_THROWS_WITH(load_tensor(st, st->at("i"), at::kFloat),
                    Catch::Contains("tensor 'i'") && Catch::Contains("expected a floating-point"));
}

TEST_CASE("widen_into is exact for every F16 and BF16 bit pattern, and copies other dtypes", "[unit]") {
  // All 65,536 bit patterns (subnormals, ±0, ±inf, NaNs) nine times over, plus an odd tail past
  // the 8-wide loop: 589,829 elements, enough to be cut into pieces over threads.
  at::Tensor bits = at::arange(0, 9 * 65536 + 5, at::kInt).remainder(65536).to(at::kShort);
  const int saved_threads = at::get_num_threads();
  for (const auto& [dt, threads] : std::vector<std::pair<at::ScalarType, int>>{
           {at::kHalf, 1},
           {at::kHalf, 2},
           {at::kHalf, 3},
           {at::kBFloat16, 1},
           {at::kBFloat16, 2}}) {
    INFO(dt << ", " << threads << " thread(s)");
    at::set_num_threads(threads);
    const at::Tensor src = bits.view(dt);  // same bytes, reinterpreted
    const at::Tensor want = src.to(at::kFloat);
    at::Tensor got = at::full({src.numel()}, 7.0f);
    widen_into(src, got);
    at::set_num_threads(saved_threads);
    // Bit-for-bit, NaNs included (at::equal would call NaN != NaN).
    const at::Tensor gi = got.view(at::kInt), wi = want.view(at::kInt);
    const at::Tensor nan = at::isnan(want);
    CHECK(at::equal(at::isnan(got), nan));
    const at::Tensor bad = (gi != wi).logical_and(nan.logical_not());
    if (bad.any().item<bool>()) {
      const auto k = bad.nonzero()[0][0].item<std::int64_t>();
      INFO("first difference at bit pattern " << k << ": got " << got[k].item<float>()
                                              << ", expected " << want[k].item<float>());
      CHECK(false);
    }
  }
  // A non-contiguous float32 source and a 2-D destination of the same size.
  at::Tensor f = at::randn({6, 5}).t();
  at::Tensor out = at::empty({5, 6});
  widen_into(f, out);
  CHECK(at::equal(out, f.contiguous()));
  CHECK_THROWS_WITH(widen_into(f, at::empty({4, 6})), Catch::Contains("30 elements into 24"));
  CHECK_THROWS_WITH(widen_into(f, at::empty({5, 6}, at::kDouble)), Catch::Contains("widen_into"));
}

TEST_CASE("tensor_bytes gives contiguous CPU bytes for the writer", "[unit]") {
  at::Tensor t = at::arange(12, at::kFloat).view({3, 4}).t();  // non-contiguous
  auto b = tensor_bytes("x", t);
  CHECK(b.data.name == "x");
  CHECK(b.data.dtype == Dtype::F32);
  CHECK(b.data.shape == std::vector<std::int64_t>{4, 3});
  CHECK(b.data.nbytes == 48);
  const float* f = static_cast<const float*>(b.data.data);
  CHECK(f[0] == 0.0f);
  CHECK(f[1] == 4.0f);  // row-major order of the transposed view
  auto s = tensor_bytes("s", at::scalar_tensor(2.0, at::kDouble));
  CHECK(s.data.shape.empty());
  CHECK(s.data.nbytes == 8);
}

TEST_CASE("hash64 is XXH64", "[unit]") {
  // Published XXH64 test vectors (seed 0); the pangram exercises the 32-byte main loop.
  CHECK(hash64("", 0) == 0xEF46DB3751D8E999ULL);
  CHECK(hash64("a", 1) == 0xD24EC4F1A98C6E5BULL);
  CHECK(hash64("abc", 3) == 0x44BC2CF5AD770999ULL);
  CHECK(hash64("Hello, World!", 13) == 0xC49AACF8080FE47FULL);
  const char* fox = "The quick brown fox jumps over the lazy dog";
  CHECK(hash64(fox, std::strlen(fox)) == 0x0B242D361FDA71BCULL);
  CHECK(hash64("abc", 3, 1) != hash64("abc", 3, 0));
  CHECK(hash_combine(1, 2) != hash_combine(2, 1));
  CHECK(hex64(0xABCULL) == "0000000000000abc");
}

TEST_CASE("fmt formats torch types", "[unit]") {
  at::Tensor t = at::zeros({768, 512});
  CHECK(fmt::format("{}", t.sizes()) == "[768, 512]");
  CHECK(fmt::format("{}", at::kFloat) == "Float");
  CHECK(fmt::format("{}", at::ones({1})).find('1') != std::string::npos);
  CHECK(shape_string({}) == "[]");
}

TEST_CASE("all_finite: NaN and infinities in every floating dtype, no false alarm on overflow", "[unit]") {
  for (auto dt : {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}) {
    INFO("dtype " << dt);
    at::Tensor t = at::randn({64, 48}).to(dt);
    CHECK(all_finite(t));
    CHECK(all_finite(at::empty({0, 3}, dt)));
    for (double bad : {std::nan(""), HUGE_VAL, -HUGE_VAL}) {
      at::Tensor u = t.clone();
      u[17][5] = bad;
      CHECK_FALSE(all_finite(u));
    }
    at::Tensor both = t.clone();  // +Inf and -Inf: the sum is NaN, still refused
    both[0][0] = HUGE_VAL;
    both[1][1] = -HUGE_VAL;
    CHECK_FALSE(all_finite(both));
  }
  // Finite float64 values whose sum overflows: the exact check decides.
  CHECK(all_finite(at::full({8}, 1e308, at::kDouble)));
  CHECK(all_finite(at::full({2, 3}, 60000.0, at::kHalf)));
}

TEST_CASE("dense matches at::linear, and its bytes do not depend on the thread count", "[unit]") {
  struct Threads {  // restores LibTorch's pool size
    int saved = at::get_num_threads();
    ~Threads() { set_compute_threads(saved); }
  } restore;
  at::manual_seed(7);
  // Row counts from 1 to several hundred, and output widths below, at and above the 64-column
  // split alignment, odd tails included (the split follows the output width). An earlier split
  // that followed the thread count failed on an AVX-512 machine (rows 48 and 96 on differed).
  // The last three: CLIP-L-like widths, so that the BLAS's blocking over `in` takes several steps.
  const std::vector<std::array<std::int64_t, 3>> shapes = {
      {1, 96, 40},   {5, 96, 40},    {48, 96, 40},   {97, 96, 40},   {468, 96, 40},
      {50, 96, 63},  {50, 96, 64},   {50, 96, 65},   {50, 96, 127},  {50, 96, 129},
      {3, 96, 700},  {145, 96, 769}, {301, 800, 333}, {468, 768, 1000}, {37, 768, 3072}};
  for (const auto& [M, K, N] : shapes) {
    INFO("x [" << M << ", " << K << "], w [" << N << ", " << K << "]");
    const at::Tensor x = at::randn({M, K});
    const at::Tensor w = at::randn({N, K});
    const at::Tensor b = at::randn({N});
    at::Tensor first;
    for (int threads : {1, 2, 3, 4}) {
      INFO("threads " << threads);
      set_compute_threads(threads);
      const at::Tensor y = dense(x, w, b);
      REQUIRE(y.sizes() == at::IntArrayRef({M, N}));
      const at::Tensor ref = at::linear(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
      const double err = (y.to(at::kDouble) - ref).abs().max().item<double>();
      const double scale = ref.abs().max().item<double>();
      INFO("max |dense - float64 linear| " << err << " of max |y| " << scale);
      CHECK(err <= 1e-5 * scale);
      if (threads == 1) {
        first = y;
      } else {
        const at::Tensor diff = (y != first).nonzero();
        INFO(diff.size(0) << " elements differ from --threads 1; first at (row, column) "
                          << (diff.size(0) ? fmt::format("{}", diff[0]) : std::string("-")));
        CHECK(bytes_of(y) == bytes_of(first));
      }
    }
  }
  // Views, other dtypes and shapes fall back to at::linear and still agree.
  const at::Tensor xt = at::randn({96, 70}).t();  // non-contiguous [70, 96]
  const at::Tensor w = at::randn({40, 96}), b = at::randn({40});
  CHECK(at::allclose(dense(xt, w, b), at::linear(xt, w, b), 1e-5, 1e-5));
  const at::Tensor xd = at::randn({70, 96}, at::kDouble);
  CHECK(at::equal(dense(xd, w.to(at::kDouble), b.to(at::kDouble)),
                  at::linear(xd, w.to(at::kDouble), b.to(at::kDouble))));
}

TEST_CASE("run_tasks runs every index once and rethrows the first error in index order", "[unit]") {
  for (int threads : {1, 2, 5}) {
    INFO("threads " << threads);
    std::vector<std::atomic<int>> hits(37);
    run_tasks(hits.size(), threads, [&](std::size_t i) { ++hits[i]; });
    for (auto& h : hits) CHECK(h.load() == 1);
    run_tasks(0, threads, [&](std::size_t) { FAIL("no task expected"); });
  }
  std::vector<std::atomic<int>> hits(9);
  try {
    run_tasks(hits.size(), 3, [&](std::size_t i) {
      ++hits[i];
      if (i == 4 || i == 7) throw Error(fmt::format("task {}", i));
    });
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == "task 4");
  }
  for (auto& h : hits) CHECK(h.load() == 1);  // several threads: the others still ran
}

TEST_CASE("gram is Wᵀ W or W Wᵀ, exactly symmetric", "[unit]") {
  at::manual_seed(3);
  for (auto [r, c] : std::vector<std::pair<std::int64_t, std::int64_t>>{{1, 1}, {7, 3}, {3, 7}, {130, 65}}) {
    INFO("W [" << r << ", " << c << "]");
    const at::Tensor W = at::randn({r, c}, at::kDouble);
    for (bool cols : {true, false}) {
      INFO("of columns " << cols);
      const at::Tensor G = gram(W, cols);
      const at::Tensor ref = cols ? at::matmul(W.t(), W) : at::matmul(W, W.t());
      REQUIRE(G.sizes() == ref.sizes());
      const double err = (G - ref).abs().max().item<double>();
      INFO("max |gram - matmul| " << err);
      CHECK(err <= 1e-12 * ref.abs().max().item<double>());
      CHECK(at::equal(G, G.t()));
    }
  }
  // A transposed view and float32 take the fallback and agree too.
  const at::Tensor V = at::randn({5, 9}, at::kDouble).t();
  CHECK(at::allclose(gram(V, true), at::matmul(V.t(), V)));
  const at::Tensor F = at::randn({6, 4});
  CHECK(at::allclose(gram(F, false), at::matmul(F, F.t())));
}
