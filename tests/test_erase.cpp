// erase: k-means and K2 against the golden, the violence cases from the stored states, and the
// invariants of SPEC §1.3 / CONVENTIONS "Tests" on random inputs.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <Eigen/Dense>

#include "../src/erase_internal.h"
#include "test_erase_util.h"

#include <catch2/catch.hpp>

#include "speed/error.h"

using namespace speed;
using erase_test::edits_json;

namespace {

at::Tensor randn(std::vector<std::int64_t> shape, std::uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, g, at::TensorOptions().dtype(at::kDouble));
}

// A random edit problem: d = 24, retain rows spanning `rank` dimensions exactly.
struct Problem {
  EmbeddingSets sets;
  std::vector<LayerInput> layers;
};

Problem random_problem(std::int64_t d = 24, std::int64_t n = 40, std::int64_t rank = 16,
                       std::uint64_t seed = 7) {
  Problem p;
  p.sets.targets = randn({3, d}, seed);
  p.sets.anchors = randn({3, d}, seed + 1);
  const at::Tensor basis = randn({rank, d}, seed + 2);
  p.sets.retain = at::matmul(randn({n, rank}, seed + 3), basis) * 0.5;
  p.sets.empty = randn({77, d}, seed + 4);
  const std::int64_t outs[] = {16, 48, 24, 8};
  for (int i = 0; i < 4; ++i)
    p.layers.push_back(
        {fmt::format("layer.{}", i), randn({outs[i], d}, seed + 10 + i).to(at::kFloat)});
  return p;
}

double max_rel_iec(const EditResult& r, const std::vector<LayerInput>& layers) {
  double worst = 0;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const at::Tensor W = layers[i].weight.to(at::kDouble);
    worst = std::max(worst, at::matmul(r.layers[i].delta, r.k2).norm().item<double>() /
                                at::matmul(W, r.k2).norm().item<double>());
  }
  return worst;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST_CASE("k-means and K2 match the golden", "[golden]") {
  const at::Tensor empty = erase_test::load(erase_test::edits_st(), "empty_prompt/hidden_states");
  const auto& k3 = edits_json().at("k2").at("iec3");
  KMeansResult km;
  const at::Tensor k2 = invariants_k2(empty, 3, &km);
  const at::Tensor want = erase_test::load(erase_test::edits_st(), "K2/iec3").t();
  REQUIRE(k2.sizes() == want.sizes());
  const double diff = (k2 - want).abs().max().item<double>();
  INFO("max |K2 - K2_golden| = " << diff);
  CHECK(diff < 1e-12);
  CHECK(km.assignment == k3.at("assignment").get<std::vector<int>>());
  CHECK(km.sizes == k3.at("cluster_sizes").get<std::vector<int>>());
  CHECK(km.iterations == k3.at("iterations").get<int>());
  const at::Tensor k0 = invariants_k2(empty, 0);
  CHECK((k0 - erase_test::load(erase_test::edits_st(), "K2/iec0").t()).abs().max().item<double>() ==
        0);
  // float32 states give the same clusters (the golden says so too).
  KMeansResult km32;
  invariants_k2(empty.to(at::kFloat), 3, &km32);
  CHECK(km32.assignment == km.assignment);
}

TEST_CASE("violence cases (all tokens, no retain source) match the golden", "[golden]") {
  // Target "violence" is encoder_prompts.txt line 4: its float32 states are in
  // encoder_tiny.safetensors.
  const auto enc = erase_test::open_st("encoder_tiny.safetensors");
  const at::Tensor hs = erase_test::load(enc, "hidden_states");
  const at::Tensor empty = erase_test::load(erase_test::edits_st(), "empty_prompt/hidden_states");
  for (const char* name : {"violence_iec0", "violence_iec3"}) {
    const auto& c = edits_json().at("cases").at(name);
    EmbeddingSets sets;
    sets.targets = hs.slice(0, 3, 4).slice(1, 1, 77).to(at::kFloat);  // [1, 76, d]
    sets.anchors = empty.slice(0, 1, 77).unsqueeze(0);                // "" rows 1..76
    sets.empty = empty;
    const auto layers = erase_test::case_layers(c);
    EraseOptions o = erase_test::case_options(c);
    for (int threads : {1, 2}) {
      o.threads = threads;
      const EditResult r = edit_layers(sets, layers, o);
      CHECK(r.retain_is_empty_prompt);
      CHECK(r.retain_rows == 76);
      erase_test::check_case(name, c, r, layers);
    }
  }
}

TEST_CASE("SPEED invariants on random inputs", "[unit]") {
  Problem p = random_problem();
  EraseOptions o;
  o.threshold = 1e-6;  // the retain rows span 16 of 24 dimensions exactly
  o.augment = 0;
  o.ipf = false;

  SECTION("ΔW K2 = 0 with λ = 0, shared and per-layer null spaces") {
    for (int aug : {0, 3})
      for (bool ipf : {false, true})
        for (int k : {0, 3}) {
          o.augment = aug, o.ipf = ipf, o.iec_clusters = k;
          o.threshold = aug > 0 ? 1e-9 : 1e-6;
          const EditResult r = edit_layers(p.sets, p.layers, o);
          INFO("aug " << aug << " ipf " << ipf << " k " << k
                      << ": max ‖ΔW K2‖/‖W K2‖ = " << max_rel_iec(r, p.layers));
          CHECK(max_rel_iec(r, p.layers) < 1e-10);
          for (const auto& l : r.layers) CHECK(l.diag.iec_residual < 1e-10);
          for (const auto& l : r.layers) CHECK(l.diag.dw_fro > 0);
        }
  }
  SECTION("λ > 0 relaxes the constraints; --no-iec drops them") {
    o.lambda = 0.5;
    CHECK(max_rel_iec(edit_layers(p.sets, p.layers, o), p.layers) > 1e-6);
    o.lambda = 0, o.no_iec = true;
    CHECK(max_rel_iec(edit_layers(p.sets, p.layers, o), p.layers) > 1e-6);
  }
  SECTION("targets equal to their anchors: W' = W") {
    p.sets.anchors = p.sets.targets.clone();
    for (bool ipf : {false, true}) {
      o.ipf = ipf;
      const EditResult r = edit_layers(p.sets, p.layers, o);
      for (std::size_t i = 0; i < r.layers.size(); ++i) {
        CHECK(r.layers[i].delta.abs().max().item<double>() == 0);
        CHECK(at::equal(apply_delta(p.layers[i].weight, r.layers[i].delta), p.layers[i].weight));
      }
    }
  }
  SECTION("retain rows whose span is the exact complement of the null space are untouched") {
    for (int aug : {0, 2}) {
      o.augment = aug;
      o.threshold = aug > 0 ? 1e-9 : 1e-6;
      const EditResult r = edit_layers(p.sets, p.layers, o);
      for (const auto& l : r.layers) {
        CHECK(l.diag.null_dim == 24 - 16 - (aug > 0 ? 1 : 0));
        CHECK(l.diag.retain_residual_max < 1e-10);
      }
    }
  }
  SECTION("threads 1 and 2 give identical bytes; the seed drives the shuffle and DPA") {
    o.augment = 4, o.ipf = true, o.threshold = 1e-9;
    o.threads = 1;
    const EditResult a = edit_layers(p.sets, p.layers, o);
    o.threads = 2;
    const EditResult b = edit_layers(p.sets, p.layers, o);
    o.seed = 1;
    const EditResult c = edit_layers(p.sets, p.layers, o);
    CHECK(a.shuffle == b.shuffle);
    CHECK(a.shuffle != c.shuffle);
    for (std::size_t i = 0; i < a.layers.size(); ++i) {
      CHECK(at::equal(a.layers[i].delta, b.layers[i].delta));
      CHECK(a.layers[i].diag.augmented_rows == b.layers[i].diag.augmented_rows);
      CHECK(a.layers[i].diag.augmented_rows > 0);
      CHECK(a.layers[i].diag.kept_rows < 40);  // IPF keeps the rows above the mean
    }
  }
  SECTION("the shuffle is torch.randperm of the seeded CPU generator") {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(0);
    const at::Tensor perm = at::randperm(40, g, at::TensorOptions().dtype(at::kLong));
    const EditResult r = edit_layers(p.sets, p.layers, o);
    CHECK(r.shuffle == std::vector<std::int64_t>(perm.data_ptr<std::int64_t>(),
                                                 perm.data_ptr<std::int64_t>() + 40));
  }
}

TEST_CASE("SPEED equals its closed form computed independently with Eigen", "[unit]") {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  auto mat = [](const at::Tensor& t) {
    const at::Tensor c = t.to(at::kDouble).contiguous();
    return Mat(Eigen::Map<const Mat>(c.data_ptr<double>(), c.size(0), c.size(1)));
  };
  // n = 8 rows in d = 24 takes the low-rank null-space path, n = 60 the dense one.
  for (std::int64_t n : {8, 60})
    for (bool ipf : {false, true}) {
      Problem p = random_problem(24, n, 24, 40 + n);
      EraseOptions o;
      o.augment = 0, o.ipf = ipf, o.lambda = 0.3, o.retain_scale = 0.8, o.iec_clusters = 3;
      o.threshold = n == 8 ? 0.05 : 2.0;
      const EditResult r = edit_layers(p.sets, p.layers, o);
      const Mat E = mat(p.sets.targets), Es = mat(p.sets.anchors), R = mat(p.sets.retain),
                K2 = mat(r.k2);
      const Mat I = Mat::Identity(24, 24);
      const Mat Ctt = E.transpose() * E / 3.0, Cat = Es.transpose() * E / 3.0;
      for (std::size_t l = 0; l < p.layers.size(); ++l) {
        const Mat W = mat(p.layers[l].weight);
        const Mat Er = W * (Cat - Ctt) * (I + Ctt).inverse();
        std::vector<int> keep;
        Eigen::VectorXd norms(R.rows());
        for (int i = 0; i < R.rows(); ++i) norms(i) = (Er * R.row(i).transpose()).norm();
        for (int i = 0; i < R.rows(); ++i)
          if (!ipf || norms(i) > norms.mean()) keep.push_back(i);
        Mat Crr = Mat::Zero(24, 24);
        for (int i : keep) Crr += R.row(i).transpose() * R.row(i);
        Crr /= static_cast<double>(keep.size());
        Eigen::SelfAdjointEigenSolver<Mat> es(Crr);
        Mat P = Mat::Zero(24, 24);
        int null_dim = 0;
        for (int k = 0; k < 24; ++k)
          if (es.eigenvalues()(k) < o.threshold)
            P += es.eigenvectors().col(k) * es.eigenvectors().col(k).transpose(), ++null_dim;
        const Mat M = (Ctt * P + o.retain_scale * I).inverse();
        const Mat S = K2.transpose() * P * M * K2 + o.lambda * Mat::Identity(K2.cols(), K2.cols());
        const Mat dW = W * (Cat - Ctt) * P * (I - M * K2 * S.inverse() * K2.transpose() * P) * M;
        const double err = (mat(r.layers[l].delta) - dW).norm() / dW.norm();
        INFO("n " << n << " ipf " << ipf << " layer " << l << ": null_dim "
                  << r.layers[l].diag.null_dim << " vs " << null_dim << ", kept "
                  << r.layers[l].diag.kept_rows << " vs " << keep.size()
                  << ", ‖ΔW − ΔW_eigen‖/‖ΔW_eigen‖ = " << err);
        CHECK(r.layers[l].diag.null_dim == null_dim);
        CHECK(r.layers[l].diag.kept_rows == static_cast<std::int64_t>(keep.size()));
        CHECK(err < 1e-9);
      }
    }
}

TEST_CASE("DPA on few retain rows (low-rank null-space path) keeps the invariants", "[unit]") {
  Problem p = random_problem(24, 8, 24, 3);
  EraseOptions o;
  o.augment = 3, o.ipf = false, o.threshold = 1e-9;
  const EditResult r = edit_layers(p.sets, p.layers, o);
  for (const auto& l : r.layers) {
    CHECK(l.diag.null_dim == 24 - 9);  // the 8 rows and v span 9 dimensions
    CHECK(l.diag.augmented_rows > 0);
    CHECK(l.diag.retain_residual_max < 1e-10);
    CHECK(l.diag.iec_residual < 1e-10);
  }
}

TEST_CASE("a given DPA direction (the pipeline's cache) gives the same bytes as computing it", "[unit]") {
  Problem p = random_problem(24, 8, 24, 3);
  EraseOptions o;
  o.augment = 3, o.threshold = 1e-9;
  const EditResult a = edit_layers(p.sets, p.layers, o);
  std::vector<LayerInput> given = p.layers;
  for (std::size_t i = 0; i < given.size(); ++i) {
    REQUIRE(a.layers[i].dpa_direction.defined());
    CHECK(a.layers[i].dpa_direction.sizes() == at::IntArrayRef({24}));
    given[i].dpa_direction = a.layers[i].dpa_direction.clone();
  }
  const EditResult b = edit_layers(p.sets, given, o);
  for (std::size_t i = 0; i < given.size(); ++i) {
    CHECK(at::equal(a.layers[i].delta, b.layers[i].delta));
    CHECK(at::equal(a.layers[i].dpa_direction, b.layers[i].dpa_direction));
  }
  given[0].dpa_direction = at::zeros({23}, at::kDouble);
  CHECK_THAT(error_of([&] { edit_layers(p.sets, given, o); }),
             Catch::Contains("DPA direction has shape [23], expected [24]"));
  o.augment = 0;  // no DPA: no direction reported
  CHECK_FALSE(edit_layers(p.sets, p.layers, o).layers[0].dpa_direction.defined());
}

TEST_CASE("the DPA direction is the last right singular vector of W", "[unit]") {
  for (std::int64_t out : {40, 24, 9}) {
    const at::Tensor W = randn({out, 24}, 100 + out);
    const at::Tensor Vh = std::get<2>(at::linalg_svd(W, false));
    const at::Tensor v_svd = Vh[Vh.size(0) - 1];
    const at::Tensor gram = out >= 24 ? at::matmul(W.t(), W) : at::matmul(W, W.t());
    at::Tensor v = speed::detail::smallest_eigenvector(gram);
    if (out < 24) v = at::matmul(W.t(), v), v = v / v.norm();
    const double align = std::abs(at::dot(v, v_svd).item<double>());
    INFO("out " << out << ": |<v, v_svd>| = " << align);
    CHECK(std::abs(1 - align) < 1e-12);
  }
  // d > 64: the shift comes from a Ritz estimate (Cholesky + block inverse iteration).
  for (std::int64_t out : {300, 200, 120}) {
    const at::Tensor W = randn({out, 200}, 200 + out);
    const at::Tensor Vh = std::get<2>(at::linalg_svd(W, false));
    const at::Tensor gram = out >= 200 ? at::matmul(W.t(), W) : at::matmul(W, W.t());
    at::Tensor v = speed::detail::smallest_eigenvector(gram);
    if (out < 200) v = at::matmul(W.t(), v), v = v / v.norm();
    const double align = std::abs(at::dot(v, Vh[Vh.size(0) - 1]).item<double>());
    INFO("out " << out << ", d 200: |<v, v_svd>| = " << align);
    CHECK(std::abs(1 - align) < 1e-12);
  }
}

TEST_CASE("UCE equals its closed form computed independently with Eigen", "[unit]") {
  Problem p = random_problem(12, 30, 12, 21);
  EraseOptions o;
  o.method = EditMethod::Uce;
  o.uce_lamb = 0.3, o.uce_erase_scale = 1.5, o.uce_preserve_scale = 0.7;
  const EditResult r = edit_layers(p.sets, p.layers, o);
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  auto mat = [](const at::Tensor& t) {
    const at::Tensor c = t.to(at::kDouble).contiguous();
    return Mat(Eigen::Map<const Mat>(c.data_ptr<double>(), c.size(0), c.size(1)));
  };
  const Mat E = mat(p.sets.targets), Es = mat(p.sets.anchors), R = mat(p.sets.retain);
  const Mat I = Mat::Identity(12, 12);
  Mat num_right = o.uce_lamb * I, den = o.uce_lamb * I;
  for (int i = 0; i < E.rows(); ++i) {
    num_right += o.uce_erase_scale * Es.row(i).transpose() * E.row(i);
    den += o.uce_erase_scale * E.row(i).transpose() * E.row(i);
  }
  for (int i = 0; i < R.rows(); ++i) {
    num_right += o.uce_preserve_scale * R.row(i).transpose() * R.row(i);
    den += o.uce_preserve_scale * R.row(i).transpose() * R.row(i);
  }
  const Mat den_inv = den.inverse();
  for (std::size_t l = 0; l < p.layers.size(); ++l) {
    const Mat W = mat(p.layers[l].weight);
    const Mat Wp = W * num_right * den_inv;
    const Mat ours = W + mat(r.layers[l].delta);
    const double err = (ours - Wp).norm() / Wp.norm();
    INFO("layer " << l << ": ‖W'_ours − W'_eigen‖/‖W'_eigen‖ = " << err);
    CHECK(err < 1e-12);
  }
}

TEST_CASE("erase errors name the problem", "[unit]") {
  Problem p = random_problem(24, 400, 24);  // full-rank retain rows, also after IPF
  EraseOptions o;
  o.augment = 0;
  o.ipf = false;
  o.threshold = 1e-6;  // nothing is below: empty null space
  CHECK_THAT(error_of([&] { edit_layers(p.sets, p.layers, o); }),
             Catch::Contains("layer 'layer.0'") &&
                 Catch::Contains("no eigenvalue below the threshold 1e-06"));
  o.ipf = true;
  CHECK_THAT(error_of([&] { edit_layers(p.sets, p.layers, o); }),
             Catch::Contains("layer 'layer.0'"));
  o.allow_empty_null_space = true;
  const EditResult r = edit_layers(p.sets, p.layers, o);
  for (const auto& l : r.layers) CHECK(l.delta.abs().max().item<double>() == 0);

  o = EraseOptions{};
  auto bad_layers = p.layers;
  bad_layers[1].weight = randn({8, 23}, 3);
  CHECK_THAT(error_of([&] { edit_layers(p.sets, bad_layers, o); }),
             Catch::Contains("layer 'layer.1' has shape [8, 23], expected [out, 24]"));
  auto sets = p.sets;
  sets.anchors = randn({2, 24}, 4);
  CHECK_THAT(error_of([&] { edit_layers(sets, p.layers, o); }),
             Catch::Contains("anchors have shape [2, 24], expected [3, 24]"));
  sets = p.sets;
  sets.retain = sets.retain.clone();
  sets.retain[0][0] = std::nan("");
  CHECK_THAT(error_of([&] { edit_layers(sets, p.layers, o); }),
             Catch::Contains("retain embeddings contain non-finite"));
  o.augment = -1;
  CHECK_THAT(error_of([&] { edit_layers(p.sets, p.layers, o); }),
             Catch::Contains("option '--augment' is -1"));
  o = EraseOptions{};
  o.all_tokens = true;
  CHECK_THAT(error_of([&] { edit_layers(p.sets, p.layers, o); }),
             Catch::Contains("(all-tokens mode)"));
  CHECK_THROWS_AS(parse_params("q"), UsageError);
  CHECK(parse_method("uce") == EditMethod::Uce);
  CHECK(params_edit(EditParams::V, false));
  CHECK_FALSE(params_edit(EditParams::V, true));
  CHECK(params_edit(EditParams::KV, true));
}
