// Options, the deterministic k-means, target covariances, UCE and the per-layer diagnostics.
// The SPEED per-layer edit and the layer scheduling live in erase_speed.cc.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include <ATen/Parallel.h>

#include "erase_internal.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/tensor.h"

namespace speed {

const char* method_name(EditMethod m) { return m == EditMethod::Speed ? "speed" : "uce"; }

const char* params_name(EditParams p) {
  switch (p) {
    case EditParams::V:
      return "v";
    case EditParams::K:
      return "k";
    case EditParams::KV:
      return "kv";
  }
  return "?";
}

EditMethod parse_method(std::string_view name) {
  if (name == "speed") return EditMethod::Speed;
  if (name == "uce") return EditMethod::Uce;
  throw UsageError(fmt::format("unknown method '{}', expected 'speed' or 'uce'", name));
}

EditParams parse_params(std::string_view name) {
  if (name == "v" || name == "V") return EditParams::V;
  if (name == "k" || name == "K") return EditParams::K;
  if (name == "kv" || name == "KV") return EditParams::KV;
  throw UsageError(fmt::format("unknown params '{}', expected 'v', 'k' or 'kv'", name));
}

bool params_edit(EditParams params, bool is_key) {
  return params == EditParams::KV || (params == EditParams::K) == is_key;
}

void validate_options(const EraseOptions& o) {
  auto bad = [](const char* opt, double v, const char* expected) {
    throw UsageError(fmt::format("option '--{}' is {}, expected {}", opt, v, expected));
  };
  if (o.augment < 0 || o.augment > 1000) bad("augment", o.augment, "0..1000");
  if (!(o.threshold > 0) || !std::isfinite(o.threshold))
    bad("threshold", o.threshold, "a positive number");
  if (!(o.retain_scale >= 0) || !std::isfinite(o.retain_scale))
    bad("retain-scale", o.retain_scale, ">= 0");
  if (!(o.lambda >= 0) || !std::isfinite(o.lambda)) bad("lambda", o.lambda, ">= 0");
  if (o.iec_clusters < 0 || o.iec_clusters > 76) bad("iec-clusters", o.iec_clusters, "0..76");
  if (!(o.uce_lamb >= 0) || !std::isfinite(o.uce_lamb)) bad("lamb", o.uce_lamb, ">= 0");
  if (!(o.uce_erase_scale >= 0) || !std::isfinite(o.uce_erase_scale))
    bad("erase-scale", o.uce_erase_scale, ">= 0");
  if (!(o.uce_preserve_scale >= 0) || !std::isfinite(o.uce_preserve_scale))
    bad("preserve-scale", o.uce_preserve_scale, ">= 0");
  if (o.threads < 0 || o.threads > 1024) bad("threads", o.threads, "0..1024");
  if (o.device != "cpu" && o.device != "cuda")
    throw UsageError(
        fmt::format("device '{}' is not supported here, expected 'cpu' or 'cuda'", o.device));
}

at::Tensor apply_delta(const at::Tensor& weight, const at::Tensor& delta) {
  SPEED_CHECK(weight.sizes() == delta.sizes(), "delta has shape {}, expected {}", delta.sizes(),
              weight.sizes());
  return (weight.to(delta.device(), at::kDouble) + delta).to(weight.device(), weight.scalar_type());
}

KMeansResult kmeans(const at::Tensor& x_in, int k, int max_iter, double tol) {
  SPEED_CHECK(x_in.dim() == 2, "k-means input has {} dimensions, expected 2", x_in.dim());
  const std::int64_t n = x_in.size(0), d = x_in.size(1);
  SPEED_CHECK(k >= 1 && k <= n, "k-means needs 1 <= k <= {} rows, got k = {}", n, k);
  at::Tensor x = x_in.to(at::kCPU, at::kDouble).contiguous();
  const double* X = x.data_ptr<double>();
  std::vector<double> c(static_cast<std::size_t>(k * d)), prev;
  for (int j = 0; j < k; ++j) {
    const std::int64_t row = static_cast<std::int64_t>(j) * n / k;  // ⌊j n / k⌋
    std::copy(X + row * d, X + (row + 1) * d, c.begin() + j * d);
  }
  KMeansResult r;
  r.assignment.assign(static_cast<std::size_t>(n), 0);
  // Plain loops in a fixed order: the result must not depend on BLAS blocking or threads.
  for (int it = 0; it < max_iter; ++it) {
    for (std::int64_t i = 0; i < n; ++i) {
      double best = std::numeric_limits<double>::infinity();
      int arg = 0;
      for (int j = 0; j < k; ++j) {
        double s = 0;
        for (std::int64_t t = 0; t < d; ++t) {
          const double diff = X[i * d + t] - c[j * d + t];
          s += diff * diff;
        }
        if (s < best) best = s, arg = j;  // strict: ties go to the lowest index
      }
      r.assignment[i] = arg;
    }
    prev = c;
    std::vector<double> sum(c.size(), 0.0);
    std::vector<std::int64_t> count(k, 0);
    for (std::int64_t i = 0; i < n; ++i) {
      const int j = r.assignment[i];
      ++count[j];
      for (std::int64_t t = 0; t < d; ++t) sum[j * d + t] += X[i * d + t];
    }
    for (int j = 0; j < k; ++j)
      if (count[j] > 0)  // an empty cluster keeps its centre
        for (std::int64_t t = 0; t < d; ++t) c[j * d + t] = sum[j * d + t] / count[j];
    ++r.iterations;
    double shift = 0;
    for (int j = 0; j < k; ++j) {
      double s = 0;
      for (std::int64_t t = 0; t < d; ++t)
        s += (c[j * d + t] - prev[j * d + t]) * (c[j * d + t] - prev[j * d + t]);
      shift += std::sqrt(s);
    }
    if (shift * shift < tol) break;
  }
  r.sizes.assign(k, 0);
  for (int a : r.assignment) ++r.sizes[a];
  r.centres = at::from_blob(c.data(), {k, d}, at::kDouble).clone();
  return r;
}

at::Tensor invariants_k2(const at::Tensor& empty, int k, KMeansResult* kmeans_out) {
  SPEED_CHECK(empty.dim() == 2 && empty.size(0) == 77,
              "empty-prompt states have shape {}, expected [77, d]", empty.sizes());
  SPEED_CHECK(k >= 0 && k <= 76, "iec clusters is {}, expected 0..76", k);
  at::Tensor e = empty.to(at::kCPU, at::kDouble);
  at::Tensor rows = e.slice(0, 0, 1);
  if (k > 0) {
    KMeansResult km = kmeans(e.slice(0, 1, 77), k);
    rows = at::cat({rows, km.centres}, 0);
    if (kmeans_out) *kmeans_out = std::move(km);
  }
  return rows.t().contiguous();  // [d, 1 + k]
}

TargetCovariances target_covariances(const at::Tensor& targets, const at::Tensor& anchors) {
  SPEED_CHECK(targets.dim() == 2 || targets.dim() == 3,
              "targets have shape {}, expected [N, d] or [N, 76, d]", targets.sizes());
  SPEED_CHECK(anchors.sizes() == targets.sizes(),
              "anchors have shape {}, expected {} (as the targets)", anchors.sizes(),
              targets.sizes());
  const std::int64_t n = targets.size(0), d = targets.size(-1);
  SPEED_CHECK(n > 0, "no target rows");
  at::Tensor t = targets.to(at::kDouble).reshape({-1, d});
  at::Tensor a = anchors.to(at::kDouble).reshape({-1, d});
  // Σ_i Σ_t e_itᵀ e_it / N: each target's 76 rows are summed, then the mean over targets.
  return {at::matmul(t.t(), t) / static_cast<double>(n),
          at::matmul(a.t(), t) / static_cast<double>(n)};
}

namespace detail {

double fro(const at::Tensor& t) { return t.norm().item<double>(); }

void check_finite(const at::Tensor& t, const char* what) {
  SPEED_CHECK(all_finite(t), "{} contain non-finite values", what);
}

namespace {

// The diagnostics other than the target residuals. dw_k2 = ΔW K2 when the caller has it cheaper.
void diagnose_common(const LayerInput& layer, const at::Tensor& W, const at::Tensor& dW,
                     const Prepared& p, LayerDiagnostics& g, const at::Tensor& dw_r_norms,
                     const at::Tensor& dw_k2) {
  g.name = layer.name;
  g.out = W.size(0);
  g.in = W.size(1);
  g.w_fro = fro(W);
  g.dw_fro = fro(dW);
  g.rel_dw = g.w_fro > 0 ? g.dw_fro / g.w_fro : 0;
  const double wk = fro(at::matmul(W, p.k2));
  g.iec_residual = wk > 0 ? fro(dw_k2.defined() ? dw_k2 : at::matmul(dW, p.k2)) / wk : 0;

  // The denominators ‖W r‖ in float32 (relative error ~1e-7, the cost of one n×d×out product);
  // the numerators ‖ΔW r‖, which are ~1e-13 for an exact null space, stay float64.
  const at::Tensor wr = at::matmul(p.retain32, W.to(at::kFloat).t()).norm(2, {1}).to(at::kDouble);
  const at::Tensor dr =
      dw_r_norms.defined() ? dw_r_norms : at::matmul(p.retain, dW.t()).norm(2, {1});
  const at::Tensor ok = wr > 0;
  const at::Tensor ratio = dr.masked_select(ok) / wr.masked_select(ok);
  if (ratio.numel() > 0) {
    g.retain_residual_mean = ratio.mean().item<double>();
    g.retain_residual_max = ratio.max().item<double>();
  }
}

// mean_i num_i / den_i over the targets with den_i > 0, from per-row squared norms [N·T]
// grouped by target (T rows each).
double residual_mean(const at::Tensor& num_sq, const at::Tensor& den_sq, std::int64_t n) {
  const at::Tensor num = num_sq.view({n, -1}).sum(1).sqrt().cpu();
  const at::Tensor den = den_sq.view({n, -1}).sum(1).sqrt().cpu();
  const double* a = num.data_ptr<double>();
  const double* b = den.data_ptr<double>();
  double sum = 0;
  std::int64_t used = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (b[i] > 0) sum += a[i] / b[i], ++used;
  }
  return used ? sum / static_cast<double>(used) : 0.0;
}

}  // namespace

void diagnose(const LayerInput& layer, const at::Tensor& W, const at::Tensor& dW, const Prepared& p,
              LayerDiagnostics& g, const at::Tensor& dw_r_norms) {
  diagnose_common(layer, W, dW, p, g, dw_r_norms, at::Tensor());
  // Targets: ‖W' e_i − W e*_i‖ / ‖W e_i − W e*_i‖ with e_i [T, d] (T = 1 or 76).
  const std::int64_t d = W.size(1);
  const at::Tensor t = p.targets.reshape({-1, d}), a = p.anchors.reshape({-1, d});
  const at::Tensor diff = at::matmul(t - a, W.t());  // (W e − W e*) rows
  const at::Tensor num = diff + at::matmul(t, dW.t());
  g.target_residual_mean = residual_mean((num * num).sum(1), (diff * diff).sum(1), p.targets.size(0));
}

void diagnose_factored(const LayerInput& layer, const at::Tensor& W, const at::Tensor& WL,
                       const at::Tensor& F, const at::Tensor& dW, const Prepared& p,
                       LayerDiagnostics& g, const at::Tensor& dw_r_norms) {
  const std::int64_t rows = p.targets.size(0) * p.targets.size(1);
  if (p.tm.size(0) != rows) return diagnose(layer, W, dW, p, g, dw_r_norms);  // T, L after a QR
  diagnose_common(layer, W, dW, p, g, dw_r_norms, at::matmul(WL, at::matmul(F, p.k2)));
  // With ΔW = (W Lᵀ) F and l = e* − e: W' e − W e* = ΔW e − W l, so over all target rows
  // [W' e − W e*] = (T Fᵀ − I)(W Lᵀ)ᵀ and [W e − W e*] = −(W Lᵀ)ᵀ: N'×N'×out work, not N'×d×out.
  // (T Fᵀ)(W Lᵀ)ᵀ = T ΔWᵀ: N'² (d + out) products, or N' d out through ΔW when that is fewer.
  const at::Tensor WLt = WL.t();
  const std::int64_t np = p.tm.size(0), d = p.tm.size(1), out = WL.size(0);
  const at::Tensor num = (np * (d + out) <= d * out ? at::matmul(at::matmul(p.tm, F.t()), WLt)
                                                    : at::matmul(p.tm, dW.t())) -
                         WLt;
  g.target_residual_mean =
      residual_mean((num * num).sum(1), (WLt * WLt).sum(1), p.targets.size(0));
}

Prepared prepare(const EmbeddingSets& sets, const EraseOptions& o, EditResult& result) {
  validate_options(o);
  Prepared p;
  p.device = at::Device(o.device == "cuda" ? at::kCUDA : at::kCPU);
  exact_float32_matmul(p.device);  // retain32's products (diagnostics)
  SPEED_CHECK(sets.empty.defined() && sets.empty.dim() == 2 && sets.empty.size(0) == 77,
              "empty-prompt states have shape {}, expected [77, d]",
              sets.empty.defined() ? shape_string(sets.empty.sizes()) : std::string("undefined"));
  const std::int64_t d = sets.empty.size(1);
  SPEED_CHECK(sets.targets.defined() && sets.anchors.defined(), "targets and anchors are required");
  const std::int64_t want_dim = o.all_tokens ? 3 : 2;
  SPEED_CHECK(
      sets.targets.dim() == want_dim && sets.targets.size(-1) == d &&
          (!o.all_tokens || sets.targets.size(1) == 76),
      "targets have shape {}, expected {}", sets.targets.sizes(),
      o.all_tokens ? fmt::format("[N, 76, {}] (all-tokens mode)", d) : fmt::format("[N, {}]", d));
  SPEED_CHECK(sets.anchors.sizes() == sets.targets.sizes(),
              "anchors have shape {}, expected {} (as the targets)", sets.anchors.sizes(),
              sets.targets.sizes());
  p.targets = sets.targets.to(p.device, at::kDouble);
  p.anchors = sets.anchors.to(p.device, at::kDouble);
  if (!o.all_tokens) {  // uniform [N, 1, d] so that the diagnostics treat both modes alike
    p.targets = p.targets.unsqueeze(1);
    p.anchors = p.anchors.unsqueeze(1);
  }
  check_finite(p.targets, "target embeddings");
  check_finite(p.anchors, "anchor embeddings");
  const at::Tensor empty = sets.empty.to(p.device, at::kDouble);
  check_finite(empty, "empty-prompt states");
  TargetCovariances cov = target_covariances(p.targets, p.anchors);
  p.ctt = cov.ctt;
  p.cat = cov.cat;

  if (sets.retain.defined() && sets.retain.numel() > 0) {
    SPEED_CHECK(sets.retain.dim() == 2 && sets.retain.size(1) == d,
                "retain rows have shape {}, expected [n, {}]", sets.retain.sizes(), d);
    p.retain = sets.retain.to(p.device, at::kDouble);
    check_finite(p.retain, "retain embeddings");
  } else {
    p.retain = empty.slice(0, 1, 77);
    result.retain_is_empty_prompt = true;
    result.notes.push_back("no retain source: R = rows 1..76 of the empty prompt");
  }
  result.retain_rows = p.retain.size(0);
  p.retain32 = p.retain.to(at::kFloat);
  p.inv_n = 1.0 / static_cast<double>(p.targets.size(0));
  p.tm = p.targets.reshape({-1, d});
  p.l = p.anchors.reshape({-1, d}) - p.tm;
  if (p.tm.size(0) > d) {  // keep N' <= d: T = Q R, so TᵀT = RᵀR and LᵀT = (QᵀL)ᵀ R
    at::Tensor q, r;
    std::tie(q, r) = at::linalg_qr(p.tm, "reduced");
    p.l = at::matmul(q.t(), p.l);
    p.tm = r;
  }
  result.k2 = invariants_k2(empty, o.iec_clusters, &result.kmeans).to(p.device);
  p.k2 = result.k2;
  p.eye = at::eye(d, at::TensorOptions().dtype(at::kDouble).device(p.device));
  return p;
}

}  // namespace detail

namespace {

// UCE (SPEC §1.6): W' = (λW + s_e Σ W e*ᵀe + s_p Σ W rᵀr)(λI + s_e Σ eᵀe + s_p Σ rᵀr)⁻¹, i.e.
// ΔW = W · s_e (Σ e*ᵀe − Σ eᵀe) D⁻¹ with D the right factor: one d×d solve shared by all layers.
EditResult edit_uce(const EmbeddingSets& sets, const std::vector<LayerInput>& layers,
                    const EraseOptions& o) {
  EditResult result;
  const auto t0 = std::chrono::steady_clock::now();
  detail::Prepared p = detail::prepare(sets, o, result);
  const double n = static_cast<double>(p.targets.size(0));
  const at::Tensor ctt_sum = p.ctt * n, cat_sum = p.cat * n;
  const at::Tensor crr_sum = at::matmul(p.retain.t(), p.retain);
  const at::Tensor D =
      o.uce_lamb * p.eye + o.uce_erase_scale * ctt_sum + o.uce_preserve_scale * crr_sum;
  // G = s_e (Cat − Ctt) D⁻¹ = (D⁻¹ s_e (Cat − Ctt)ᵀ)ᵀ since D is symmetric.
  const at::Tensor G =
      at::linalg_solve(D, (o.uce_erase_scale * (cat_sum - ctt_sum)).t()).t().contiguous();
  detail::check_finite(G, "the UCE system (singular: try --lamb > 0)");
  const auto t1 = std::chrono::steady_clock::now();
  result.notes.push_back("uce: one shared d×d solve");
  result.layers.resize(layers.size());
  detail::for_each_layer(layers.size(), o.threads, [&](std::size_t i) {
    const at::Tensor W = detail::layer_weight(layers[i], p);
    LayerResult& lr = result.layers[i];
    lr.delta = at::matmul(W, G);
    LayerDiagnostics& g = lr.diag;
    g.retain_rows = g.kept_rows = g.rows_used = p.retain.size(0);
    g.eig_below = g.eig_above = std::numeric_limits<double>::quiet_NaN();
    detail::diagnose(layers[i], W, lr.delta, p, g);
  });
  const auto t2 = std::chrono::steady_clock::now();
  result.seconds_shared = std::chrono::duration<double>(t1 - t0).count();
  result.seconds_layers = std::chrono::duration<double>(t2 - t1).count();
  return result;
}

}  // namespace

EditResult edit_layers(const EmbeddingSets& sets, const std::vector<LayerInput>& layers,
                       const EraseOptions& options) {
  // The whole edit runs with single-threaded BLAS and LibTorch ops, parallel over layers only:
  // OpenBLAS's factorizations (potrf, getrf) and LibTorch's large reductions split their work by
  // the thread count, so any other choice would make the bytes depend on --threads. Nested
  // pools on few cores would only oversubscribe anyway.
  EraseOptions o = options;
  if (o.threads <= 0) o.threads = std::max(1, at::get_num_threads());
  const SerialBlas serial_blas;
  struct TorchThreads {
    int saved = at::get_num_threads();
    TorchThreads() { at::set_num_threads(1); }
    ~TorchThreads() { at::set_num_threads(saved); }
  } torch_threads;
  if (o.method == EditMethod::Uce) return edit_uce(sets, layers, o);
  return detail::edit_speed(sets, layers, o);
}

}  // namespace speed
