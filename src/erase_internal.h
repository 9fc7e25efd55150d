// Internal pieces shared by erase.cc and erase_speed.cc.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include <ATen/ATen.h>

#include "speed/erase.h"

namespace speed::detail {

// Inputs of an edit in float64 on the math device.
struct Prepared {
  at::Device device = at::kCPU;
  at::Tensor targets, anchors;  // [N, T, d]
  at::Tensor retain;            // [n, d] (rows 1..76 of "" when there is no retain source)
  at::Tensor ctt, cat;          // [d, d]
  at::Tensor tm, l;             // target rows T and L = anchors − targets [N', d] (N' = N·T, or
                     // d after a QR when N' > d): Ctt = TᵀT / N, Cat − Ctt = LᵀT / N
  double inv_n = 1;     // 1 / N
  at::Tensor retain32;  // retain rows in float32 (only for the ‖W r‖ denominators)
  at::Tensor k2;        // [d, 1 + k]
  at::Tensor eye;       // I_d
};

Prepared prepare(const EmbeddingSets& sets, const EraseOptions& options, EditResult& result);
// W of `layer` as float64 on the math device, checked: 2-D, width d, finite.
at::Tensor layer_weight(const LayerInput& layer, const Prepared& p);
// Fills the SPEC §4 residuals and norms of `g` (the counts are the caller's).
// `dw_r_norms`: ‖ΔW r‖ of every retain row when the caller has them cheaper (else from dW).
void diagnose(const LayerInput& layer, const at::Tensor& W, const at::Tensor& dW, const Prepared& p,
              LayerDiagnostics& g, const at::Tensor& dw_r_norms = at::Tensor());
// The same for ΔW = (W Lᵀ) F (the SPEED factor), at N'×N'×out cost for the target residuals.
void diagnose_factored(const LayerInput& layer, const at::Tensor& W, const at::Tensor& WL,
                       const at::Tensor& F, const at::Tensor& dW, const Prepared& p,
                       LayerDiagnostics& g, const at::Tensor& dw_r_norms);
double fro(const at::Tensor& t);
void check_finite(const at::Tensor& t, const char* what);

// Runs fn(0..n-1) on `threads` workers (0: at::get_num_threads()). Each index writes only its own
// outputs, so results do not depend on the thread count; the error of the lowest failing index is
// rethrown.
void for_each_layer(std::size_t n, int threads, const std::function<void(std::size_t)>& fn);

// Eigenvector of the smallest eigenvalue of a symmetric PSD matrix [d, d] (unit norm, any sign).
at::Tensor smallest_eigenvector(const at::Tensor& gram);

EditResult edit_speed(const EmbeddingSets& sets, const std::vector<LayerInput>& layers,
                      const EraseOptions& options);

}  // namespace speed::detail
