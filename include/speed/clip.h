// speed/clip.h: the CLIP text transformer (reference/formats.md §3), strict loading both ways.
//
// The module tree spells the canonical (HF CLIPTextModel) names: named_parameters() keys are
// embeddings.token_embedding.weight, encoder.layers.N.self_attn.q_proj.weight, ... OpenCLIP files
// (fused in_proj, positional_embedding, ln_1/ln_2, c_fc/c_proj, ln_final) are mapped at load.
// Weights stored F16/BF16/F32 compute in F32 (or F64 for reference checks); the token embedding
// stays in its stored dtype (a view over the mapping) and only the gathered rows are widened.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "speed/checkpoint.h"
#include "speed/safetensors.h"

namespace speed {

struct TextEncoderOptions {
  at::ScalarType dtype = at::kFloat;  // compute precision: kFloat or kDouble
  std::string device = "cpu";         // "cpu", "cuda", "cuda:N"
  // false: validate and hash only. Every check of load() runs and weights_hash() is the same,
  // but no tensor is converted or copied and forward() / encode_prefix() throw. For callers that
  // may need no forward at all (every prompt in the embedding cache).
  bool weights = true;
};

class TextEncoder {
 public:
  // Strict load of `info` from `st`: a missing tensor, a tensor under info.prefix that is not
  // used (except position_ids, text_projection, logit_scale, attn_mask, layers beyond
  // output_layer and a final LN that is not applied), or a wrong shape throws speed::Error naming
  // the tensor with got/expected.
  static std::unique_ptr<TextEncoder> load(std::shared_ptr<const SafeTensors> st,
                                           const TextEncoderInfo& info,
                                           TextEncoderOptions options = {});
  // Encoder `index` of an opened checkpoint.
  static std::unique_ptr<TextEncoder> load(const Checkpoint& ckpt, std::size_t index,
                                           TextEncoderOptions options = {});
  // From tensors under canonical HF names (no prefix), e.g. built in a test; same strictness.
  static std::unique_ptr<TextEncoder> from_tensors(const std::map<std::string, at::Tensor>& named,
                                                   const TextEncoderInfo& info,
                                                   TextEncoderOptions options = {});
  ~TextEncoder();
  TextEncoder(const TextEncoder&) = delete;
  TextEncoder& operator=(const TextEncoder&) = delete;

  const TextEncoderInfo& info() const;
  at::ScalarType dtype() const;
  at::Device device() const;
  int layers_run() const;  // transformer blocks applied before the output
  // True when the forward reads each block's weight matrices from their stored bytes (widened to
  // float32 per layer on the CPU) rather than from a converted copy: the source must stay mapped.
  bool widens_per_layer() const;

  // Keys and values, per layer, of a prefix shared by many prompts (every prompt starts with
  // SOT): computed once, then forward() continues after it. Rows after the prefix attend to it
  // exactly as in a full forward, so the result is the same up to float rounding.
  struct Prefix {
    std::int64_t length = 0;
    std::vector<at::Tensor> keys, values;  // per layer [1, heads, length, head_dim]
    at::Tensor states;                     // [1, length, width]: the prefix's own output rows
  };
  // ids: [T] or [1, T] integer ids of the prefix.
  Prefix encode_prefix(const at::Tensor& ids) const;

  // ids: [B, T] integer (any device), 1 <= T <= positions (- prefix length), values < vocab.
  // Returns [B, T, width] in the compute dtype on the encoder's device: the output of the
  // configured layer (+ final LN when enabled), causal mask, no padding mask, position ids
  // 0..T-1 (or P..P+T-1 after a prefix of length P).
  at::Tensor forward(const at::Tensor& ids, const Prefix* prefix = nullptr) const;
  // The same for several batches [B_g, T_g] (any lengths) in one pass over the weights: the
  // linear layers run on all their rows packed together, attention per batch. Rows are those of
  // forward() on each batch alone (up to float rounding).
  std::vector<at::Tensor> forward_many(const std::vector<at::Tensor>& ids,
                                       const Prefix* prefix = nullptr) const;
  // The same with one prefix (or nullptr) per batch, of any lengths, still in one pass.
  std::vector<at::Tensor> forward_many(const std::vector<at::Tensor>& ids,
                                       const std::vector<const Prefix*>& prefixes) const;
  // One batch of a forward_many call and what comes before its ids: nothing, a prefix computed
  // earlier, or row `after_row` of an earlier batch of the same call (`after` = its index), whose
  // keys and values are then taken layer by layer as the pass goes. Prefixes and the prompts
  // after them thus share one pass over the weights (a prefix's own rows are its batch's output).
  struct Input {
    at::Tensor ids;                   // [B, T]
    const Prefix* prefix = nullptr;   // or:
    int after = -1;                   // an earlier input of the same call (B >= 1) ...
    std::int64_t after_row = 0;       // ... and which of its rows precedes these ids
  };
  std::vector<at::Tensor> forward_many(const std::vector<Input>& inputs) const;

  // Canonical name -> parameter, in module order (q/k/v are views into one fused tensor). With
  // widens_per_layer(), the blocks' weight matrices are the stored tensors (fp16/bf16 views).
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() const;

  // XXH64 over the stored bytes of every tensor used (in canonical order), their names, dtypes
  // and shapes, and the configuration that changes the output (layers run, final LN,
  // activation, heads, pad id). Computed on first call (~246 MB for CLIP-L), then cached.
  std::uint64_t weights_hash() const;

  struct Impl;  // internal (src/clip_internal.h)

 private:
  explicit TextEncoder(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Writes a seeded synthetic text encoder with real shapes (e.g. CLIP-L: width 768, 12 layers,
// MLP 3072, vocab 49408) in `dtype` under `info.prefix` in HF naming: for benchmarks and tests.
// Weights ~ N(0, 0.02), LN weights 1, so activations stay O(1).
void write_synthetic_text_encoder(const std::string& path, const TextEncoderInfo& info,
                                  Dtype dtype, std::uint64_t seed, bool overwrite = false);

}  // namespace speed
