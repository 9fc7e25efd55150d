// Helpers of the erase tests: golden files and side-by-side comparison against edits_tiny.json.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "speed/erase.h"
#include "speed/safetensors.h"
#include "speed/tensor.h"

namespace erase_test {

inline std::string golden(const std::string& name) {
  return std::string(SPEED_SHARED_DIR) + "/golden/" + name;
}

inline const nlohmann::json& edits_json() {
  static const nlohmann::json j = [] {
    std::ifstream f(golden("edits_tiny.json"));
    REQUIRE(f.good());
    return nlohmann::json::parse(f);
  }();
  return j;
}

inline std::shared_ptr<const speed::SafeTensors> open_st(const std::string& name) {
  return std::make_shared<const speed::SafeTensors>(speed::SafeTensors::open(golden(name)));
}

inline const std::shared_ptr<const speed::SafeTensors>& fixture() {
  static const auto st = open_st("fixture_tiny_f32.safetensors");
  return st;
}
inline const std::shared_ptr<const speed::SafeTensors>& edits_st() {
  static const auto st = open_st("edits_tiny.safetensors");
  return st;
}

inline at::Tensor load(const std::shared_ptr<const speed::SafeTensors>& st,
                       const std::string& name) {
  return speed::load_tensor(st, st->at(name), at::kDouble).clone();
}

// The 32 K/V layers of a case, in the golden's (the reference's) order, W from the fixture.
inline std::vector<speed::LayerInput> case_layers(const nlohmann::json& c) {
  std::vector<speed::LayerInput> layers;
  for (const auto& l : c.at("layers"))
    layers.push_back(
        {l.at("name").get<std::string>(),
         speed::load_tensor(fixture(), fixture()->at(l.at("ldm_name").get<std::string>()),
                            at::kFloat)});
  return layers;
}

inline speed::EraseOptions case_options(const nlohmann::json& c) {
  const auto& o = c.at("options");
  speed::EraseOptions e;
  e.params = speed::parse_params(o.at("params").get<std::string>());
  e.augment = o.at("augment").get<int>();
  e.ipf = o.at("ipf").get<bool>();
  e.threshold = o.at("threshold").get<double>();
  e.retain_scale = o.at("retain_scale").get<double>();
  e.lambda = o.at("lambda").get<double>();
  e.iec_clusters = o.at("iec_clusters").get<int>();
  e.all_tokens = o.at("all_tokens").get<bool>();
  e.seed = o.at("seed").get<std::uint64_t>();
  return e;
}

inline double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

// Compares every layer of `r` with the case: stored ΔW (Frobenius, relative to the golden),
// ‖ΔW‖, sampled entries, null_dim, IEC residual and the report residuals. Prints a side-by-side
// table of the worst layers on failure.
inline std::pair<double, double> check_case(const std::string& name, const nlohmann::json& c,
                                            const speed::EditResult& r,
                                            const std::vector<speed::LayerInput>& layers,
                                            double tol = 1e-4) {
  const auto& gl = c.at("layers");
  REQUIRE(r.layers.size() == gl.size());
  const double lambda = c.at("options").at("lambda").get<double>();
  std::ostringstream bad;
  int failures = 0;
  double worst_stored = 0, worst_fro = 0;
  for (std::size_t i = 0; i < gl.size(); ++i) {
    const auto& g = gl[i];
    const auto& d = r.layers[i].diag;
    const at::Tensor& dW = r.layers[i].delta;
    const double dw_fro = g.at("dW_fro").get<double>();
    std::vector<std::string> why;
    const double e_fro = rel(d.dw_fro, dw_fro);
    worst_fro = std::max(worst_fro, e_fro);
    if (e_fro > tol) why.push_back(fmt::format("dW_fro {:.9g} vs {:.9g}", d.dw_fro, dw_fro));
    if (d.null_dim != g.at("null_dim").get<std::int64_t>())
      why.push_back(fmt::format("null_dim {} vs {}", d.null_dim, g.at("null_dim").get<int>()));
    if (c.at("options").at("augment").get<int>() == 0 &&
        d.rows_used != g.at("retain_rows_used").get<std::int64_t>())
      why.push_back(
          fmt::format("rows_used {} vs {}", d.rows_used, g.at("retain_rows_used").get<int>()));
    for (const auto& s : g.at("sampled")) {
      const double want = s[3].get<double>();
      const double got =
          dW.index({s[0].get<std::int64_t>(), s[1].get<std::int64_t>()}).item<double>();
      if (std::abs(got - want) > tol * dw_fro)
        why.push_back(
            fmt::format("dW[{},{}] {:.9g} vs {:.9g}", s[0].get<int>(), s[1].get<int>(), got, want));
    }
    if (g.at("stored").get<bool>()) {
      const at::Tensor Wp = load(edits_st(), name + "/" + g.at("name").get<std::string>());
      const at::Tensor dWg = Wp - layers[i].weight.to(at::kDouble);
      const double e = (dW.cpu() - dWg).norm().item<double>() / dWg.norm().item<double>();
      worst_stored = std::max(worst_stored, e);
      if (e > tol) why.push_back(fmt::format("stored |dW - dW_golden| / |dW_golden| = {:.3g}", e));
    }
    const double iec = g.at("iec_residual").get<double>();
    if (lambda == 0 ? d.iec_residual > 1e-10 : rel(d.iec_residual, iec) > 1e-3)
      why.push_back(fmt::format("iec_residual {:.6g} vs {:.6g}", d.iec_residual, iec));
    const double trm = g.at("target_residual_mean").get<double>();
    if (std::abs(d.target_residual_mean - trm) > 1e-3 * std::max(trm, 1e-3))
      why.push_back(
          fmt::format("target_residual_mean {:.9g} vs {:.9g}", d.target_residual_mean, trm));
    const double rrm = g.at("retain_residual_mean").get<double>(),
                 rrx = g.at("retain_residual_max").get<double>();
    if (std::abs(d.retain_residual_mean - rrm) > 1e-3 * std::max(rrm, 1e-6) ||
        std::abs(d.retain_residual_max - rrx) > 1e-3 * std::max(rrx, 1e-6))
      why.push_back(fmt::format("retain_residual mean/max {:.6g}/{:.6g} vs {:.6g}/{:.6g}",
                                d.retain_residual_mean, d.retain_residual_max, rrm, rrx));
    if (!why.empty()) {
      ++failures;
      bad << "  " << g.at("name").get<std::string>() << ":";
      for (const auto& w : why) bad << " [" << w << "]";
      bad << "\n";
    }
  }
  INFO(name << ": worst stored-layer relative error " << worst_stored
            << ", worst |dW| relative error " << worst_fro << "\n"
            << bad.str());
  CHECK(failures == 0);
  return {worst_stored, worst_fro};
}

}  // namespace erase_test
