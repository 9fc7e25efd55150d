// [cuda]: the edit on the GPU equals the edit on the CPU (same code path, noise drawn on the CPU).
// Without a GPU: skipped with a visible warning, or failed under SPEED_REQUIRE_CUDA=1 (test_cuda.h).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>

#include "speed/erase.h"
#include "test_cuda.h"

using namespace speed;

namespace {

// A seeded edit problem in d dimensions: 5 targets, retain rows that span at most `rank`
// dimensions (so C_rr has a null space whichever path decomposes it), 6 layers of different
// widths (`outs`, at least d for d > 64 so that the DPA direction's Gram has no null space).
struct Problem {
  EmbeddingSets sets;
  std::vector<LayerInput> layers;
};

Problem make_problem(std::int64_t retain_rows, std::int64_t rank, bool all_tokens,
                     std::int64_t d = 64) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(20261201);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Problem p;
  if (all_tokens) {
    p.sets.targets = at::randn({2, 76, d}, g, f64);
    p.sets.anchors = at::randn({2, 76, d}, g, f64) * 0.5;
  } else {
    p.sets.targets = at::randn({5, d}, g, f64);
    p.sets.anchors = at::randn({5, d}, g, f64) * 0.5;
  }
  if (retain_rows > 0)
    p.sets.retain =
        at::matmul(at::randn({retain_rows, rank}, g, f64), at::randn({rank, d}, g, f64)) * 0.3;
  p.sets.empty = at::randn({77, d}, g, f64);
  const std::int64_t small[] = {32, 64, 96, 48, 80, 64};
  const std::int64_t wide[] = {d, d + 32, 2 * d, d + 64, d, d + 16};
  for (int i = 0; i < 6; ++i) {
    const std::int64_t out = d > 64 ? wide[i] : small[i];
    p.layers.push_back({"layer" + std::to_string(i), at::randn({out, d}, g, f64).to(at::kFloat)});
  }
  return p;
}

EmbeddingSets to_device(const EmbeddingSets& s, const at::Device& dev) {
  EmbeddingSets o;
  o.targets = s.targets.to(dev);
  o.anchors = s.anchors.to(dev);
  if (s.retain.defined()) o.retain = s.retain.to(dev);
  o.empty = s.empty.to(dev);
  return o;
}

void compare(const char* name, const Problem& p, EraseOptions o) {
  o.device = "cpu";
  const EditResult cpu = edit_layers(p.sets, p.layers, o);
  o.device = "cuda";
  std::vector<LayerInput> gpu_layers;
  for (const auto& l : p.layers) gpu_layers.push_back({l.name, l.weight.to(at::kCUDA)});
  const EditResult gpu = edit_layers(to_device(p.sets, at::Device(at::kCUDA)), gpu_layers, o);
  REQUIRE(gpu.layers.size() == cpu.layers.size());
  CHECK(gpu.shuffle == cpu.shuffle);
  for (std::size_t i = 0; i < cpu.layers.size(); ++i) {
    const auto& a = cpu.layers[i];
    const auto& b = gpu.layers[i];
    CHECK(b.delta.device().is_cuda());
    const double ref = a.delta.norm().item<double>();
    const double err = (b.delta.cpu() - a.delta).norm().item<double>() / std::max(ref, 1e-300);
    INFO(name << " " << a.diag.name << ": |dW| cpu " << ref << ", gpu "
              << b.delta.norm().item<double>() << ", relative difference " << err << "; null_dim "
              << a.diag.null_dim << " vs " << b.diag.null_dim << "; rows used " << a.diag.rows_used
              << " vs " << b.diag.rows_used);
    CHECK(a.diag.null_dim == b.diag.null_dim);
    CHECK(a.diag.kept_rows == b.diag.kept_rows);
    CHECK(a.diag.augmented_rows == b.diag.augmented_rows);
    CHECK(err < 1e-8);
    CHECK(std::abs(a.diag.iec_residual - b.diag.iec_residual) < 1e-8);
  }
}

}  // namespace

TEST_CASE("cuda: the edit on the GPU matches the CPU", "[cuda]") {
  if (!test::cuda_or_skip()) return;
  EraseOptions celeb;  // celebrity-like: IPF off, DPA on, small τ
  celeb.ipf = false;
  celeb.threshold = 1e-4;
  celeb.retain_scale = 0.05;
  // 40 rows + the DPA direction span 41 > 64 / 2 dimensions: C_rr decomposed d×d.
  compare("celebrity-like, dense", make_problem(40, 40, false), celeb);
  // 20 rows + the DPA direction span 21 <= 64 / 2: C_rr decomposed in that span (QR + a 21×21
  // eigh), the path of real celebrity runs (100 rows in 768 dimensions).
  compare("celebrity-like, span", make_problem(20, 20, false), celeb);
  // d = 128 > 64: the DPA direction from the Ritz estimate and shifted Cholesky factor of each
  // weight's Gram (CLIP-L's 768), not from a full eigendecomposition.
  compare("celebrity-like, d 128", make_problem(20, 20, false, 128), celeb);

  EraseOptions inst;  // instance-like: IPF + DPA, many rows of low rank (the d×d path)
  compare("instance-like", make_problem(200, 24, false), inst);

  EraseOptions shared = inst;  // IPF and DPA off: the shared factor
  shared.ipf = false;
  shared.augment = 0;
  compare("shared", make_problem(200, 24, false), shared);

  EraseOptions nud;  // nudity-like: all tokens, no retain source, soft IEC
  nud.all_tokens = true;
  nud.retain_scale = 0.7;
  nud.lambda = 0.5;
  compare("nudity-like", make_problem(0, 0, true), nud);

  EraseOptions uce;
  uce.method = EditMethod::Uce;
  compare("uce", make_problem(40, 40, false), uce);
}
