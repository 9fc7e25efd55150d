// speed/embed.h: prompts -> text-encoder rows, exactly as Stable Diffusion sees them (SPEC §1.1).
//
// Last-subject mode encodes only ids 0..j(p) of each prompt (causal attention, no padding mask:
// the row is exact), grouped by length into batches; all-tokens mode runs the full 77 ids.
// Each row is computed as if the prompt were alone (no batching artefacts).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "speed/checkpoint.h"
#include "speed/tokenizer.h"

namespace speed {

class TextEncoder;  // speed/clip.h

struct EmbedOptions {
  std::string device = "cpu";               // "cpu" or "cuda"
  std::optional<std::string> cache_dir;     // embedding cache (nullopt: no cache); entries made
                                            // on a GPU are kept apart from the CPU's
  int max_batch_tokens = 4096;              // batch size cap, in tokens
  at::ScalarType dtype = at::kFloat;        // compute and result precision (kDouble for checks)
};

// $XDG_CACHE_HOME/speed-erase, else $HOME/.cache/speed-erase; nullopt when neither is set.
std::optional<std::string> default_cache_dir();

// The model's conditioning encoder(s) + tokenizer, ready to embed prompts.
class Embedder {
 public:
  // Loads the text encoder(s) of `ckpt` (strict) and the tokenizer found per SPEC §2.
  Embedder(const Checkpoint& ckpt, const std::optional<std::string>& tokenizer_path,
           EmbedOptions options = {});
  ~Embedder();
  Embedder(const Embedder&) = delete;
  Embedder& operator=(const Embedder&) = delete;

  std::int64_t width() const;  // d, the context width (768 SD1, 1024 SD2, 2048 SDXL)
  int pad_id() const;  // of the first encoder
  const ClipTokenizer& tokenizer() const;
  // Hex hash of the encoder weights (the cache key's first part).
  const std::string& weights_hash() const;

  std::vector<TokenizedPrompt> tokenize(const std::vector<std::string>& prompts) const;

  // [N, d] float32 (options.dtype) on the CPU: the last-subject row of each prompt (index
  // n - 2), computed from ids 0..n-2 only. Identical prompts are encoded once.
  at::Tensor last_subject_rows(const std::vector<std::string>& prompts);
  // [N, 77, d] float32 (options.dtype) on the CPU: full hidden states of each prompt (77 ids,
  // padding included, each encoder with its own pad id).
  at::Tensor all_tokens(const std::vector<std::string>& prompts);
  // The same from already tokenized prompts (ids as tokenized with pad_id()).
  at::Tensor last_subject_rows(const std::vector<TokenizedPrompt>& tokens);
  at::Tensor all_tokens(const std::vector<TokenizedPrompt>& tokens);
  // Several lists in one call, hence one pass over the encoder weights for all of them (and for
  // the prefixes they share): for each, what last_subject_rows ([N, d]) or all_tokens
  // ([N, 77, d]) would return for it alone (up to float rounding).
  struct Request {
    const std::vector<TokenizedPrompt>* tokens = nullptr;
    bool all_tokens = false;
  };
  std::vector<at::Tensor> embed(const std::vector<Request>& requests);

  // Whether the encoder weights were converted for a forward pass (false while every prompt
  // came from the cache).
  bool weights_loaded() const;
  // Frees the converted encoder weights once every prompt is embedded (~0.3 GB of float32 for
  // CLIP-L on a GPU; on the CPU only the small tensors, see TextEncoder::widens_per_layer); a
  // later call converts them again. The cache and the hash stay.
  void release_weights();

  // A float64 vector derived from this model's weights (e.g. a weight's DPA direction), cached
  // beside the embeddings under (kind, key): filled and true on a valid entry. put_vector
  // stores one (no-op without a cache). Entries are checksummed like the embeddings.
  bool get_vector(std::uint32_t kind, const std::vector<std::int32_t>& key, std::int64_t n,
                  double* out) const;
  void put_vector(std::uint32_t kind, const std::vector<std::int32_t>& key, std::int64_t n,
                  const double* data);

  // Embedding-cache statistics of this embedder's calls.
  std::int64_t cache_hits() const;
  std::int64_t cache_misses() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace speed
