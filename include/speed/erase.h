// speed/erase.h: the SPEED closed-form edit (SPEC §1.2-§1.3), the UCE baseline (§1.6) and their
// diagnostics (§4). Free functions over at::Tensor; every product, solve and eigen-decomposition
// runs in float64 whatever the inputs' dtype (SPEC §1.7).
//
// Shapes: d = context width, out = a layer's output width, N targets, n retain rows, T = 1 (last
// subject token) or 76 (all-tokens mode) rows per target.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <string_view>
#include <vector>

#include <ATen/ATen.h>

namespace speed {

enum class EditMethod { Speed, Uce };
enum class EditParams { V, K, KV };  // which attn2 projections to edit

const char* method_name(EditMethod m);  // "speed", "uce"
const char* params_name(EditParams p);  // "v", "k", "kv"
// Throw speed::UsageError naming the value for anything else.
EditMethod parse_method(std::string_view name);
EditParams parse_params(std::string_view name);
// True when `params` edits a to_k (is_key) or to_v weight.
bool params_edit(EditParams params, bool is_key);

// Every edit option of SPEC §3 with its default (SPEC §1.4, §1.6).
struct EraseOptions {
  EditMethod method = EditMethod::Speed;
  EditParams params = EditParams::V;
  int augment = 10;           // --augment: DPA draws per retain row (0: no DPA)
  double threshold = 0.1;     // --threshold τ: eigenvalues of C_rr below it span the null space
  double retain_scale = 1.0;  // --retain-scale s
  double lambda = 0.0;        // --lambda λ of the IEC system (0: hard constraints)
  bool ipf = true;            // false with --no-filter
  int iec_clusters = 3;       // --iec-clusters k (0: SOT row only)
  bool no_iec = false;        // --no-iec: no invariant equality constraints at all
  bool all_tokens = false;    // --all-tokens: targets/anchors use rows 1..76
  std::uint64_t seed = 0;     // --seed of the one CPU generator (shuffle + DPA noise)
  bool allow_empty_null_space = false;  // --allow-empty-null-space: ΔW = 0 instead of an error
  double uce_lamb = 0.5;                // --lamb (UCE's λ)
  double uce_erase_scale = 1.0;         // --erase-scale (UCE's s_e)
  double uce_preserve_scale = 1.0;      // --preserve-scale (UCE's s_p)
  int threads = 0;             // layers edited in parallel (0: at::get_num_threads()); results
                               // are byte-identical for any value
  std::string device = "cpu";  // where the linear algebra runs ("cpu" or "cuda")
};

// Throws speed::UsageError naming the option for out-of-range values (negative augment, τ <= 0,
// s < 0, λ < 0, k outside 0..76, ...).
void validate_options(const EraseOptions& options);

// The text-encoder rows of one edit (float32 or float64, any device).
struct EmbeddingSets {
  at::Tensor targets;  // [N, d] last-subject rows, or [N, 76, d] in all-tokens mode
  at::Tensor anchors;  // same shape as targets (row i / rows i,t pair with target i)
  at::Tensor retain;   // [n, d] last-subject rows after the target filter; undefined or n = 0:
                       // no retain source, R = rows 1..76 of `empty`
  at::Tensor empty;    // [77, d] hidden states of the empty prompt ""
};

struct LayerInput {
  LayerInput() = default;
  LayerInput(std::string n, at::Tensor w, at::Tensor dpa = {})
      : name(std::move(n)), weight(std::move(w)), dpa_direction(std::move(dpa)) {}
  std::string name;   // reported as is (the pipeline passes the canonical diffusers name)
  at::Tensor weight;  // W [out, d], any floating dtype
  // Optional: W's DPA direction [d] float64 as an earlier run computed it (it depends on W only;
  // the pipeline caches it beside the embeddings). Used as given, so the bytes match a run that
  // computes it.
  at::Tensor dpa_direction;
};

// Per-layer report entries (SPEC §4). NaN where a value does not exist (e.g. no eigenvalue below
// τ).
struct LayerDiagnostics {
  std::string name;
  std::int64_t out = 0, in = 0;
  std::int64_t retain_rows = 0;     // retain rows before IPF
  std::int64_t kept_rows = 0;       // after IPF (= retain_rows with --no-filter)
  std::int64_t augmented_rows = 0;  // DPA rows kept
  std::int64_t rows_used = 0;       // kept_rows + augmented_rows (rows entering C_rr)
  std::int64_t null_dim = 0;        // eigenvalues of C_rr below τ (rank of P); 0 for UCE
  double eig_below = 0;             // largest eigenvalue < τ (NaN if none)
  double eig_above = 0;             // smallest eigenvalue >= τ (NaN if none)
  double w_fro = 0, dw_fro = 0;
  double rel_dw = 0;        // ‖ΔW‖_F / ‖W‖_F
  double iec_residual = 0;  // ‖ΔW K2‖_F / ‖W K2‖_F (K2 of --iec-clusters, also with --no-iec)
  double target_residual_mean = 0;  // mean_i ‖W' e_i − W e*_i‖_F / ‖W e_i − W e*_i‖_F (targets
                                    // with W e_i = W e*_i are left out; 0 if all are)
  double retain_residual_mean = 0;  // ‖ΔW r‖ / ‖W r‖ over the retain rows, before IPF/DPA
  double retain_residual_max = 0;
};

struct LayerResult {
  at::Tensor delta;  // ΔW [out, d], float64, on the options' device
  LayerDiagnostics diag;
  at::Tensor dpa_direction;  // [d] float64 on the CPU when DPA ran (given or computed)
};

struct KMeansResult {
  at::Tensor centres;           // [k, d] float64
  std::vector<int> assignment;  // cluster of each input row
  std::vector<int> sizes;       // rows per cluster
  int iterations = 0;           // centre updates performed
};

struct EditResult {
  std::vector<LayerResult> layers;  // in the order of the input layers
  at::Tensor k2;                    // [d, 1 + k] float64 (columns: SOT state, centres)
  KMeansResult kmeans;              // empty for k = 0
  std::int64_t retain_rows = 0;     // rows of R (76 when R is the empty prompt)
  bool retain_is_empty_prompt = false;
  std::vector<std::int64_t> shuffle;  // the randperm(|R|) drawn first
  double seconds_shared = 0;          // C_tt/C_at/K2/shared factors
  double seconds_layers = 0;          // per-layer work, all layers
  std::vector<std::string> notes;     // for the report (e.g. "C_rr shared by all layers")
};

// W' = W + ΔW in W's dtype and device (round to nearest).
at::Tensor apply_delta(const at::Tensor& weight, const at::Tensor& delta);

// Deterministic k-means of SPEC §1.2. x [n, d] (any float dtype), 1 <= k <= n. Initial centres
// rows floor(j n / k); Lloyd iterations (ties to the lowest index, an empty cluster keeps its
// centre) until (Σ_j ‖c_j − c_j,prev‖)² < tol or max_iter updates. float64.
KMeansResult kmeans(const at::Tensor& x, int k, int max_iter = 1000, double tol = 1e-4);

// K2 [d, 1 + k]: the SOT row of `empty` [77, d] and the k centres over its rows 1..76.
at::Tensor invariants_k2(const at::Tensor& empty, int k, KMeansResult* kmeans_out = nullptr);

// Ctt = mean_i Σ_t e_itᵀ e_it, Cat = mean_i Σ_t e*_itᵀ e_it (d×d float64). targets/anchors as in
// EmbeddingSets.
struct TargetCovariances {
  at::Tensor ctt, cat;
};
TargetCovariances target_covariances(const at::Tensor& targets, const at::Tensor& anchors);

// The whole edit: every layer of `layers` (in the given order, which fixes the DPA random stream;
// the pipeline passes the reference's order, SPEC §1.3). Dispatches on options.method.
// Throws speed::Error on shape mismatches, non-finite inputs and (SPEED) an empty null space.
EditResult edit_layers(const EmbeddingSets& sets, const std::vector<LayerInput>& layers,
                       const EraseOptions& options);

}  // namespace speed
