// The SPEED per-layer edit (SPEC §1.3) and its scheduling over layers.
//
// Three phases, so that layers run in parallel while the random stream is consumed exactly in the
// reference's order (one CPU generator: randperm first, then the DPA draws layer by layer):
//   A (parallel)   the influences ‖E r‖ (E = W G), IPF, the DPA direction v;
//   B (sequential) the DPA noise of every layer, in layer order, reduced at once to the kept
//                  perturbed rows (row index, coefficient c of r' = r + c v);
//   C (parallel)   C_rr, its eigen-decomposition, P and the closed form.
// With IPF and DPA both off, C_rr (and so P and the whole right factor H of ΔW = W H) is the same
// for every layer: it is computed once.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <tuple>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "erase_internal.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/tensor.h"

namespace speed::detail {

at::Tensor layer_weight(const LayerInput& layer, const Prepared& p) {
  const at::Tensor& w = layer.weight;
  SPEED_CHECK(w.defined() && w.dim() == 2 && w.size(1) == p.eye.size(0),
              "layer '{}' has shape {}, expected [out, {}]", layer.name,
              w.defined() ? shape_string(w.sizes()) : std::string("undefined"), p.eye.size(0));
  SPEED_CHECK(at::isFloatingType(w.scalar_type()),
              "layer '{}' has dtype {}, expected a floating type", layer.name, w.scalar_type());
  at::Tensor W = w.to(p.device, at::kDouble);
  SPEED_CHECK(all_finite(W), "layer '{}' contains non-finite values",
              layer.name);
  return W;
}

void for_each_layer(std::size_t n, int threads, const std::function<void(std::size_t)>& fn) {
  run_tasks(n, threads > 0 ? threads : std::max(1, at::get_num_threads()), fn);
}

namespace {

constexpr std::int64_t kChunk = 128;    // the reference's chunk_size
constexpr std::int64_t kMiniBatch = 8;  // generate_perturbed_embs' mini_batch

// P without forming it: P = B Bᵀ, or I − B Bᵀ (complement), whichever basis is smaller.
struct NullSpace {
  at::Tensor basis;  // [d, m] orthonormal
  bool complement = false;
  std::int64_t dim = 0;
  double below = std::numeric_limits<double>::quiet_NaN();
  double above = std::numeric_limits<double>::quiet_NaN();
};

NullSpace null_space(const at::Tensor& crr, double tau) {
  at::Tensor evals, evecs;
  std::tie(evals, evecs) = at::linalg_eigh(crr);  // ascending
  const at::Tensor ev = evals.cpu();
  const double* e = ev.data_ptr<double>();
  const std::int64_t d = ev.numel();
  NullSpace ns;
  while (ns.dim < d && e[ns.dim] < tau) ++ns.dim;
  if (ns.dim > 0) ns.below = e[ns.dim - 1];
  if (ns.dim < d) ns.above = e[ns.dim];
  ns.complement = 2 * ns.dim > d;
  ns.basis = ns.complement ? evecs.slice(1, ns.dim) : evecs.slice(1, 0, ns.dim);
  return ns;
}

[[noreturn]] void empty_null_space(const std::string& layer, double tau, double smallest,
                                   bool shared) {
  throw Error(
      fmt::format("layer '{}'{}: C_rr has no eigenvalue below the threshold {} (smallest {:.6g}), "
                  "so the edit would be zero",
                  layer, shared ? " (C_rr is shared by all layers)" : "", tau, smallest),
      "raise --threshold, use fewer retain texts, or pass --allow-empty-null-space to accept ΔW = "
      "0");
}

// X P for rows X [r, d].
at::Tensor apply_p(const NullSpace& ns, const at::Tensor& X) {
  const at::Tensor xb = at::matmul(X, ns.basis);
  return ns.complement ? X - at::matmul(xb, ns.basis.t()) : at::matmul(xb, ns.basis.t());
}

// ΔW = W H with H = A P (I − M K2 (K2ᵀ P M K2 + λI)⁻¹ K2ᵀ P) M, M = (Ctt P + sI)⁻¹. A and Ctt have
// rank N' (the target rows T, L = anchors − targets): A = Lᵀ T / N, Ctt = Tᵀ T / N, so
// H = Lᵀ F with F [N', d], and M is applied through Woodbury,
//   Y M = (Y − (Y Tᵀ) C⁻¹ X0) / s,  M Z = (Z − Tᵀ C⁻¹ X0 Z) / s,  X0 = T P / N,  C = sI + X0 Tᵀ,
// so no d×d product, inverse or solve is needed per layer (ΔW = (W Lᵀ) F).
at::Tensor left_factor(const Prepared& p, const NullSpace& ns, const EraseOptions& o,
                       const std::string& layer) {
  const at::Tensor TP = apply_p(ns, p.tm);  // T P [N', d]
  const at::Tensor X0 = TP * p.inv_n;
  const at::Tensor C =
      o.retain_scale * at::eye(p.tm.size(0), p.tm.options()) + at::matmul(X0, p.tm.t());
  const at::Tensor CX = at::linalg_solve(C, X0);  // C⁻¹ X0 [N', d]
  auto row_m = [&](const at::Tensor& Y) {
    return (Y - at::matmul(at::matmul(Y, p.tm.t()), CX)) / o.retain_scale;
  };
  if (o.no_iec) return row_m(TP) * p.inv_n;
  const at::Tensor PKt = apply_p(ns, p.k2.t());  // K2ᵀ P [k1, d]
  const at::Tensor MK =
      (p.k2 - at::matmul(p.tm.t(), at::matmul(CX, p.k2))) / o.retain_scale;  // M K2
  const std::int64_t k1 = p.k2.size(1), np = p.tm.size(0);
  const at::Tensor S = at::matmul(PKt, MK) + o.lambda * at::eye(k1, p.tm.options());
  const at::Tensor sv = at::linalg_svdvals(S).cpu();
  const double smax = sv[0].item<double>(), smin = sv[k1 - 1].item<double>();
  if (!(smin > smax * 1e-13))
    throw Error(
        fmt::format("layer '{}': the IEC system K2ᵀ P M K2 + λI is singular (singular values "
                    "{:.3g} .. {:.3g})",
                    layer, smax, smin),
        "the null space does not reach the invariants: use --lambda > 0, fewer --iec-clusters, "
        "--no-iec, or a larger --threshold");
  const at::Tensor RM = row_m(at::cat({TP, PKt}, 0));  // [T P M; K2ᵀ P M]
  const at::Tensor F =
      RM.slice(0, 0, np) - at::matmul(at::matmul(TP, MK), at::linalg_solve(S, RM.slice(0, np)));
  return F * p.inv_n;
}

}  // namespace

namespace {

// x ← (L Lᵀ)⁻¹ x by two triangular solves (BLAS trsm on L as it is: cholesky_solve would copy
// the d×d factor on every call).
at::Tensor chol_solve(const at::Tensor& L, const at::Tensor& x) {
  return at::linalg_solve_triangular(L.mT(), at::linalg_solve_triangular(L, x, false), true);
}

// Estimates (λ1, λ2, residual bound) of a symmetric positive definite `gram` without a full
// eigenvalue solve: one Cholesky factor, block inverse iteration on 8 vectors, Rayleigh-Ritz.
// About a third of eigvalsh's cost for d = 768 (the factor dominates). False when gram is not
// numerically positive definite.
bool ritz_estimate(const at::Tensor& gram, double& l1, double& l2, double& resid) {
  const std::int64_t d = gram.size(0), k = 8;
  at::Tensor L0, info;
  std::tie(L0, info) = at::linalg_cholesky_ex(gram);
  if (info.item<int>() != 0) return false;
  // A fixed, generic start block (deterministic).
  const at::Tensor i = at::arange(1, d + 1, gram.options()).unsqueeze(1);
  const at::Tensor j = at::arange(1, k + 1, gram.options()).unsqueeze(0);
  at::Tensor X = std::get<0>(at::linalg_qr(at::sin(i * j * 1.618033988749895 + j), "reduced"));
  for (int it = 0; it < 12; ++it)
    X = std::get<0>(at::linalg_qr(chol_solve(L0, X), "reduced"));
  const at::Tensor GX = at::matmul(gram, X);
  at::Tensor theta, Y;
  std::tie(theta, Y) = at::linalg_eigh(at::matmul(X.t(), GX));
  const at::Tensor x = at::matmul(X, Y.select(1, 0));
  const double t0 = theta[0].item<double>();
  resid = (at::matmul(GX, Y.select(1, 0)) - t0 * x).norm().item<double>();
  l1 = t0;
  l2 = theta[1].item<double>();
  return std::isfinite(l1) && std::isfinite(l2) && std::isfinite(resid);
}

}  // namespace

// The eigenvector of the smallest eigenvalue λ1 of a symmetric PSD matrix by inverse iteration
// with the Cholesky factor of gram − σI, σ just below λ1 (LAPACK's stein does the same on the
// tridiagonal form). σ comes from a Ritz estimate (θ1 ≥ λ1 and, by the Krylov-Weinstein bound,
// θ1 − ‖r‖ ≤ λ1): the factor succeeding proves σ < λ1. Otherwise, or for small matrices, λ1 and
// λ2 come from eigvalsh; a full eigh is the last fallback.
at::Tensor smallest_eigenvector(const at::Tensor& gram) {
  const std::int64_t d = gram.size(0);
  auto iterate = [&](const at::Tensor& L) {
    // A fixed, generic start vector (deterministic, never orthogonal to v in practice).
    at::Tensor x = at::sin(at::arange(1, d + 1, gram.options()) * 1.618033988749895).unsqueeze(1);
    x = x / x.norm();
    for (int it = 0; it < 200; ++it) {
      at::Tensor y = chol_solve(L, x);
      y = y / y.norm();
      // Converged when the direction stops changing (sign-independent).
      const double change = 1.0 - std::abs(at::sum(y * x).item<double>());
      x = y;
      if (change < 1e-15) break;
    }
    return x.squeeze(1).contiguous();
  };
  auto factor = [&](double sigma, at::Tensor& L) {
    // gram − σI in one d×d copy (not eye, σ·eye and the difference: fresh memory is what costs,
    // docs/performance.md, seventh session); same values, so the same bytes.
    at::Tensor shifted = gram.clone();
    shifted.diagonal().sub_(sigma);
    at::Tensor info;
    std::tie(L, info) = at::linalg_cholesky_ex(shifted);
    return info.item<int>() == 0;
  };
  at::Tensor L;
  double l1 = 0, l2 = 0, resid = 0;
  if (d > 64 && ritz_estimate(gram, l1, l2, resid)) {
    const double scale = std::max(gram.diagonal().max().item<double>(), 1e-300);
    const double delta = std::max(1e-3 * std::max(l2 - l1, 0.0), 1e-10 * scale);
    if (factor(l1 - 1.01 * resid - delta, L)) return iterate(L);
  }
  const at::Tensor ev = at::linalg_eigvalsh(gram).cpu();
  const double* e = ev.data_ptr<double>();
  const double scale = std::max(std::abs(e[d - 1]), 1e-300);
  const double gap = d > 1 ? e[1] - e[0] : scale;
  const double delta = std::max(1e-3 * gap, 1e-10 * scale);
  if (!factor(e[0] - delta, L)) return std::get<1>(at::linalg_eigh(gram)).select(1, 0).contiguous();
  return iterate(L);
}

namespace {

// Right singular vector of W for its smallest singular value in the reduced SVD (the last column
// of V), through the smaller Gram matrix: for out < d, v ∝ Wᵀu with u the last eigenvector of WWᵀ.
at::Tensor dpa_direction(const at::Tensor& W) {
  if (W.size(0) >= W.size(1)) return smallest_eigenvector(gram(W, true));
  at::Tensor v = at::matmul(W.t(), smallest_eigenvector(gram(W, false)));
  return (v / v.norm()).contiguous();
}

struct LayerWork {
  at::Tensor W, WL;  // W [out, d]; W Lᵀ [out, N']
  at::Tensor kept;   // indices into the shuffled R (int64, math device)
  at::Tensor v;      // DPA direction [d]
  // What phase B needs of E r' = E r + c E v for the kept rows r, on the CPU: ‖E r‖², (E r)·(E v)
  // and ‖E v‖², so that ‖E r'‖² = ‖E r‖² + 2c (E r)·(E v) + c² ‖E v‖² costs O(1) per noise row.
  at::Tensor v_cpu, er_sq, er_ev;
  double ev_sq = 0;
  at::Tensor aug_rows;   // kept perturbed rows: source index into kept (int64) ...
  at::Tensor aug_c;      // ... and coefficient c (float64)
};

// n·v for one float32 noise row (fixed summation order: the bytes never depend on threads).
double noise_dot(const float* n, const double* v, std::int64_t d) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::int64_t k = 0;
  for (; k + 4 <= d; k += 4) {
    s0 += static_cast<double>(n[k]) * v[k];
    s1 += static_cast<double>(n[k + 1]) * v[k + 1];
    s2 += static_cast<double>(n[k + 2]) * v[k + 2];
    s3 += static_cast<double>(n[k + 3]) * v[k + 3];
  }
  for (; k < d; ++k) s0 += static_cast<double>(n[k]) * v[k];
  return (s0 + s1) + (s2 + s3);
}

// Phase B for one layer: the reference's generate_perturbed_embs, chunk by chunk. Only the noise
// draws touch d-sized data; the influence of each perturbed row is O(1) (see LayerWork).
void draw_augmentation(LayerWork& w, at::Generator& gen, const EraseOptions& o, std::int64_t d) {
  const std::int64_t nk = w.kept.size(0);
  const double* v = w.v_cpu.data_ptr<double>();
  const double* sq = w.er_sq.data_ptr<double>();
  const double* ab = w.er_ev.data_ptr<double>();
  const double bb = w.ev_sq;
  std::vector<std::int64_t> rows_out, rows;
  std::vector<double> c_out, cs, norms;
  const auto per_chunk = static_cast<std::size_t>(std::min(nk, kChunk) * std::max(o.augment, 0));
  rows.reserve(per_chunk), cs.reserve(per_chunk), norms.reserve(per_chunk);
  for (std::int64_t c0 = 0; c0 < nk; c0 += kChunk) {
    const std::int64_t c1 = std::min(nk, c0 + kChunk);
    rows.clear(), cs.clear(), norms.clear();
    for (std::int64_t mb = c0; mb < c1; mb += kMiniBatch) {
      const std::int64_t b = std::min(kMiniBatch, c1 - mb);
      for (int a = 0; a < o.augment; ++a) {
        const at::Tensor noise = at::randn({b, d}, gen, at::TensorOptions().dtype(at::kFloat));
        const float* n = noise.data_ptr<float>();
        for (std::int64_t r = 0; r < b; ++r) {
          const double c = noise_dot(n + r * d, v, d);  // r + n v vᵀ = r + c vᵀ
          const std::int64_t k = mb + r;
          rows.push_back(k);
          cs.push_back(c);
          norms.push_back(std::sqrt(std::max(0.0, sq[k] + 2.0 * c * ab[k] + c * c * bb)));
        }
      }
    }
    if (norms.empty()) continue;
    double mean = 0;
    for (double x : norms) mean += x;
    mean /= static_cast<double>(norms.size());
    for (std::size_t i = 0; i < norms.size(); ++i) {
      if (norms[i] > mean) rows_out.push_back(rows[i]), c_out.push_back(cs[i]);
    }
  }
  const at::Device dev = w.W.device();
  w.aug_rows = at::tensor(rows_out, at::TensorOptions().dtype(at::kLong)).to(dev);
  w.aug_c = at::tensor(c_out, at::TensorOptions().dtype(at::kDouble)).to(dev);
}

// C_rr over the kept rows and the kept perturbed rows r + c v, without forming the latter:
// Σ (r + cv)(r + cv)ᵀ = Σ r rᵀ + u vᵀ + v uᵀ + (Σ c²) v vᵀ with u = Σ c r, so
// C_rr = (Xᵀ diag(mult) X + u vᵀ + v uᵀ + c2 v vᵀ) / count.
struct RetainCov {
  at::Tensor X,
      mult;         // rows [nk, d]; multiplicity of each (1 + its kept perturbations), or undefined
  at::Tensor u, v;  // DPA terms (undefined without DPA)
  double c2 = 0, count = 0;
};

RetainCov retain_covariance(const at::Tensor& Rk, const LayerWork* w) {
  RetainCov c;
  c.X = Rk;
  c.count = static_cast<double>(Rk.size(0));
  if (!w || !w->aug_rows.defined() || w->aug_rows.numel() == 0) return c;
  const std::int64_t nk = Rk.size(0);
  c.mult = at::bincount(w->aug_rows, {}, nk).to(at::kDouble) + 1.0;
  const at::Tensor csum = at::zeros({nk}, Rk.options()).index_add_(0, w->aug_rows, w->aug_c);
  c.u = at::matmul(Rk.t(), csum);
  c.v = w->v;
  c.c2 = (w->aug_c * w->aug_c).sum().item<double>();
  c.count += static_cast<double>(w->aug_rows.size(0));
  return c;
}

// Σ_i m_i z_iᵀ z_i + the DPA terms, for rows Z = X Q (Q = I: the dense d×d C_rr).
at::Tensor covariance(const RetainCov& c, const at::Tensor& Z, const at::Tensor& u,
                      const at::Tensor& v) {
  at::Tensor crr = at::matmul(Z.t(), c.mult.defined() ? Z * c.mult.unsqueeze(1) : Z);
  if (c.v.defined()) {
    const at::Tensor uv = at::outer(u, v);
    crr = crr + uv + uv.t() + c.c2 * at::outer(v, v);
  }
  return crr / c.count;
}

// The null space of C_rr. When its rows span m < d/2 dimensions (few retain rows, e.g. 100
// celebrities in 768 dimensions; DPA adds only v to the span), C_rr is decomposed in an
// orthonormal basis of that span (m×m) instead of d×d: the d − m directions outside it have
// eigenvalue 0 and belong to the null space, the rest is the same decomposition.
NullSpace retain_null_space(const RetainCov& c, double tau) {
  const std::int64_t d = c.X.size(1);
  const std::int64_t m = c.X.size(0) + (c.v.defined() ? 1 : 0);
  if (2 * m > d) return null_space(covariance(c, c.X, c.u, c.v), tau);
  const at::Tensor B = c.v.defined() ? at::cat({c.X.t(), c.v.unsqueeze(1)}, 1) : c.X.t();
  const at::Tensor Qb = std::get<0>(at::linalg_qr(B, "reduced"));  // [d, m], orthonormal
  const at::Tensor vq = c.v.defined() ? at::matmul(Qb.t(), c.v) : at::Tensor();
  const at::Tensor uq = c.v.defined() ? at::matmul(Qb.t(), c.u) : at::Tensor();
  at::Tensor evals, evecs;
  std::tie(evals, evecs) = at::linalg_eigh(covariance(c, at::matmul(c.X, Qb), uq, vq));
  const at::Tensor ev = evals.cpu();
  const double* e = ev.data_ptr<double>();
  std::int64_t small = 0;
  while (small < m && e[small] < tau) ++small;
  NullSpace ns;
  ns.dim = (d - m) + small;
  if (small > 0) ns.below = e[small - 1];
  if (d > m) ns.below = small > 0 ? std::max(ns.below, 0.0) : 0.0;
  if (small < m) ns.above = e[small];
  ns.basis = at::matmul(Qb, evecs.slice(1, small));  // eigenvectors at or above τ
  ns.complement = true;
  return ns;
}

}  // namespace

EditResult edit_speed(const EmbeddingSets& sets, const std::vector<LayerInput>& layers,
                      const EraseOptions& o) {
  EditResult result;
  const auto t0 = std::chrono::steady_clock::now();
  Prepared p = prepare(sets, o, result);
  const std::int64_t d = p.eye.size(0), n = p.retain.size(0);
  SPEED_CHECK(o.retain_scale > 0,
              "option '--retain-scale' is {}, expected > 0 for SPEED (M = (Ctt P + sI)⁻¹)",
              o.retain_scale);

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const at::Tensor perm = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
  result.shuffle.assign(perm.data_ptr<std::int64_t>(), perm.data_ptr<std::int64_t>() + n);
  const at::Tensor R = p.retain.index_select(0, perm.to(p.device));

  // E = W A (I + Ctt)⁻¹ = (W Lᵀ) J with J = T (I + Ctt)⁻¹ / N [N', d] ((I + Ctt) is SPD):
  // IPF ranks rows by ‖E r‖ = ‖(W Lᵀ)(J r)‖ with RJ = R Jᵀ shared, so no layer forms E, as long
  // as N' <= d (n N' out per layer); with more target rows than d (e.g. 1,000 targets) each layer
  // forms E = (W Lᵀ) J [out, d] and takes R Eᵀ (n d out + out N' d).
  const at::Tensor J = at::linalg_solve(p.eye + p.ctt, p.tm.t()).t() * p.inv_n;
  const bool shared = !o.ipf && o.augment == 0;
  const bool ipf_via_e = p.tm.size(0) > d;
  const at::Tensor RJ = shared || ipf_via_e ? at::Tensor() : at::matmul(R, J.t());
  NullSpace shared_ns;
  at::Tensor shared_F, shared_RF;
  if (shared) {
    shared_ns = retain_null_space(retain_covariance(R, nullptr), o.threshold);
    const std::string first = layers.empty() ? std::string("-") : layers.front().name;
    if (shared_ns.dim == 0 && !o.allow_empty_null_space)
      empty_null_space(first, o.threshold, shared_ns.above, true);
    shared_F = shared_ns.dim == 0 ? at::zeros_like(p.tm) : left_factor(p, shared_ns, o, first);
    shared_RF = at::matmul(p.retain, shared_F.t());
    result.notes.push_back(
        "IPF and DPA off: C_rr, P and the edit's factor are shared by all layers");
  }
  const auto t1 = std::chrono::steady_clock::now();

  const std::size_t L = layers.size();
  std::vector<LayerWork> work(L);
  result.layers.resize(L);
  // Phases A and C run as one task list (all A tasks are handed out before any C task) and phase
  // B runs beside them in one thread, each layer as soon as its phase A is done: the random
  // stream is consumed in layer order while other layers compute, and C(i) waits only for B(i).
  const bool pipeline = !shared && o.augment > 0;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> a_state(L, 0), b_state(L, 0);  // 0 pending, 1 done, 2 failed
  auto set_state = [&](std::vector<int>& v, std::size_t i, int st) {
    {
      std::lock_guard<std::mutex> lock(mu);
      v[i] = st;
    }
    cv.notify_all();
  };
  auto wait_state = [&](const std::vector<int>& v, std::size_t i) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return v[i] != 0; });
    return v[i];
  };
  double secs_a = 0, secs_b = 0, secs_c = 0;  // summed over layers (CPU-side work per phase)
  auto add_secs = [&](double& total, std::chrono::steady_clock::time_point since) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
    std::lock_guard<std::mutex> lock(mu);
    total += s;
  };
  std::exception_ptr b_error;
  bool b_failed = false;              // touched by the one thread that runs phase B
  auto step_b = [&](std::size_t i) {  // phase B of layer i (callers go in layer order)
    if (wait_state(a_state, i) == 2 || b_failed) {
      b_failed = true;
      set_state(b_state, i, 2);
      return;
    }
    try {
      const auto tb = std::chrono::steady_clock::now();
      draw_augmentation(work[i], gen, o, d);
      work[i].er_sq = work[i].er_ev = at::Tensor();
      add_secs(secs_b, tb);
      set_state(b_state, i, 1);
    } catch (...) {
      b_error = std::current_exception();
      b_failed = true;
      set_state(b_state, i, 2);
    }
  };
  // Several workers: B runs in its own thread, and phase A stays at most `lag` layers ahead of
  // it (bounded memory). One worker (--threads 1): B(i) runs inline right after A(i).
  const int workers = o.threads > 0 ? o.threads : std::max(1, at::get_num_threads());
  const std::size_t lag = static_cast<std::size_t>(workers) + 1;
  std::thread drawer;
  if (pipeline && workers > 1)
    drawer = std::thread([&] {
      for (std::size_t i = 0; i < L; ++i) step_b(i);
    });

  auto phase_a = [&](std::size_t i) {
    LayerWork& w = work[i];
    w.W = layer_weight(layers[i], p);
    w.WL = at::matmul(w.W, p.l.t());
    at::Tensor ER = ipf_via_e ? at::matmul(R, at::matmul(w.WL, J).t()) : at::matmul(RJ, w.WL.t());
    if (o.ipf) {
      const at::Tensor norms = ER.norm(2, {1});
      w.kept = (norms > norms.mean()).nonzero().squeeze(1);
      // All influences equal (e.g. E = 0 when every target is its anchor): nothing to rank by.
      if (w.kept.numel() == 0)
        w.kept = at::arange(n, at::TensorOptions().dtype(at::kLong).device(p.device));
      else
        ER = ER.index_select(0, w.kept);
    } else {
      w.kept = at::arange(n, at::TensorOptions().dtype(at::kLong).device(p.device));
    }
    if (o.augment > 0) {
      const at::Tensor& given = layers[i].dpa_direction;
      if (given.defined()) {
        SPEED_CHECK(given.dim() == 1 && given.size(0) == d, "layer '{}': DPA direction has shape {}, expected [{}]",
                    layers[i].name, shape_string(given.sizes()), d);
        w.v = given.to(p.device, at::kDouble);
      } else {
        w.v = dpa_direction(w.W);
      }
      result.layers[i].dpa_direction = w.v.to(at::kCPU).contiguous();
      const at::Tensor Ev = at::matmul(w.WL, at::matmul(J, w.v));  // E v [out]
      w.v_cpu = w.v.to(at::kCPU).contiguous();
      w.er_sq = (ER * ER).sum(1).to(at::kCPU).contiguous();
      w.er_ev = at::matmul(ER, Ev).to(at::kCPU).contiguous();
      w.ev_sq = at::dot(Ev, Ev).item<double>();
    }
  };

  auto phase_c = [&](std::size_t i) {
    LayerWork& w = work[i];
    LayerResult& lr = result.layers[i];
    LayerDiagnostics& g = lr.diag;
    if (!w.W.defined()) {
      w.W = layer_weight(layers[i], p);
      w.WL = at::matmul(w.W, p.l.t());
    }
    g.retain_rows = n;
    at::Tensor F, RF;  // RF = R Fᵀ [n, N'], when the retain diagnostics go through the factor
    if (shared) {
      g.kept_rows = g.rows_used = n;
      g.null_dim = shared_ns.dim, g.eig_below = shared_ns.below, g.eig_above = shared_ns.above;
      F = shared_F, RF = shared_RF;
    } else {
      const at::Tensor Rk = R.index_select(0, w.kept);
      g.kept_rows = Rk.size(0);
      g.augmented_rows = w.aug_rows.defined() ? w.aug_rows.size(0) : 0;
      g.rows_used = g.kept_rows + g.augmented_rows;
      SPEED_CHECK(g.kept_rows > 0, "layer '{}': no retain row is left after IPF", layers[i].name);
      const NullSpace ns = retain_null_space(retain_covariance(Rk, &w), o.threshold);
      g.null_dim = ns.dim, g.eig_below = ns.below, g.eig_above = ns.above;
      if (ns.dim == 0 && !o.allow_empty_null_space)
        empty_null_space(layers[i].name, o.threshold, ns.above, false);
      F = ns.dim == 0 ? at::zeros_like(p.tm) : left_factor(p, ns, o, layers[i].name);
      // ‖ΔW r‖ over the retain rows: (R Fᵀ)(W Lᵀ)ᵀ costs n N' (d + out), R ΔWᵀ costs n d out.
      if (p.tm.size(0) * (d + w.WL.size(0)) <= d * w.WL.size(0)) RF = at::matmul(p.retain, F.t());
    }
    lr.delta = at::matmul(w.WL, F);
    SPEED_CHECK(all_finite(lr.delta), "layer '{}': the edit is not finite",
                layers[i].name);
    diagnose_factored(layers[i], w.W, w.WL, F, lr.delta, p, g,
                      (RF.defined() ? at::matmul(RF, w.WL.t()) : at::matmul(p.retain, lr.delta.t()))
                          .norm(2, {1}));
    w = LayerWork{};  // free this layer's rows early
  };

  const std::size_t a_tasks = shared ? 0 : L;
  try {
    for_each_layer(a_tasks + L, o.threads, [&](std::size_t t) {
      const auto ts = std::chrono::steady_clock::now();
      if (t < a_tasks) {
        if (pipeline && workers > 1 && t >= lag) wait_state(b_state, t - lag);
        try {
          phase_a(t);
        } catch (...) {
          set_state(a_state, t, 2);
          throw;
        }
        set_state(a_state, t, 1);
        add_secs(secs_a, ts);
        if (pipeline && workers <= 1) step_b(t);
        return;
      }
      const std::size_t i = t - a_tasks;
      if (pipeline && wait_state(b_state, i) == 2) return;  // reported by phase A or B
      phase_c(i);
      add_secs(secs_c, ts);
    });
  } catch (...) {
    if (drawer.joinable()) drawer.join();
    throw;
  }
  if (drawer.joinable()) drawer.join();
  if (b_error) std::rethrow_exception(b_error);
  const auto t2 = std::chrono::steady_clock::now();
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  log().debug(
      "edit: shared {:.3f} s, layers {:.3f} s wall; summed over layers: A (IPF, DPA "
      "direction) {:.3f} s, B (DPA noise, beside A and C) {:.3f} s, C (C_rr, null space, "
      "closed form, diagnostics) {:.3f} s",
      secs(t0, t1), secs(t1, t2), secs_a, secs_b, secs_c);
  result.seconds_shared = std::chrono::duration<double>(t1 - t0).count();
  result.seconds_layers = std::chrono::duration<double>(t2 - t1).count();
  std::int64_t empty_layers = 0;
  for (const auto& l : result.layers) empty_layers += l.diag.null_dim == 0;
  if (empty_layers > 0)
    result.notes.push_back(
        fmt::format("{} layer(s) had an empty null space and were left unchanged "
                    "(--allow-empty-null-space)",
                    empty_layers));
  return result;
}

}  // namespace speed::detail
