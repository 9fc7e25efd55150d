// speed/spm.h: sentencepiece tokenizer (T5 conventions) through an isolated module.
//
// Debian's libsentencepiece and LibTorch cannot share a link namespace (build-env.md trap 2), so
// sentencepiece lives in the MODULE libspeed_spm_impl.so, which this class loads with
// dlmopen(LM_ID_NEWLM) and talks to through a plain C ABI (bytes in, ids out).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace speed {

struct SpmTokenized {
  std::vector<std::int32_t> ids;  // exactly max_length ids: content, EOS, padding
  int n = 0;                      // non-padding ids, EOS included
  bool truncated = false;         // content was cut to max_length - 1 ids
};

class SpmTokenizer {
 public:
  // From a sentencepiece `.model` file (size-limited, validated by sentencepiece itself).
  static SpmTokenizer load(const std::string& model_path);
  // From serialized model bytes, for tests and fuzzing.
  static SpmTokenizer from_bytes(std::string_view model_bytes, const std::string& label = "<memory>");

  SpmTokenizer(SpmTokenizer&&) noexcept;
  SpmTokenizer& operator=(SpmTokenizer&&) noexcept;
  ~SpmTokenizer();

  // Piece ids of `text` (no EOS, no padding), as `spm_encode --output_format=id` prints them.
  std::vector<std::int32_t> encode(std::string_view text) const;
  // T5 conventions: no BOS, content truncated to max_length - 1, EOS appended, padded with pad_id.
  // pad_id < 0 means the model's pad id (0 for T5; 0 when the model has none).
  SpmTokenized tokenize(std::string_view text, int max_length = 77, int pad_id = -1) const;

  int vocab_size() const;
  int eos_id() const;  // the model's EOS id (1 for T5)
  int pad_id() const;  // the model's pad id, or 0 when the model defines none

 private:
  struct Impl;
  explicit SpmTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// True when `path` names a sentencepiece model (a `.model` file), so the CLI picks T5 semantics.
bool is_spm_model_path(const std::string& path);

// Path of libspeed_spm_impl.so: $SPEED_ERASE_SPM_MODULE, the build tree, the install prefix, or
// next to the running executable. Throws with a hint when none exists.
std::string find_spm_module();

}  // namespace speed
