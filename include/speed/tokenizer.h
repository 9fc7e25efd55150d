// speed/tokenizer.h: CLIP's byte-level BPE tokenizer, with the semantics of transformers'
// CLIPTokenizer with ftfy installed (SPEC §2, reference/formats.md §4).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace speed {

inline constexpr int kContext = 77;
inline constexpr int kSot = 49406;
inline constexpr int kEot = 49407;
inline constexpr int kMaxContent = 75;

struct TokenizedPrompt {
  std::array<std::int32_t, kContext> ids{};  // SOT, content, EOT, padding
  int n = 0;               // non-padding ids, SOT and EOT included
  bool truncated = false;  // more than 75 content tokens
  int last_subject() const { return n - 2 < 0 ? 0 : n - 2; }  // j(p) = n - 2 (0 for "")
};

class ClipTokenizer {
 public:
  // From the CLIP merges file (bpe_simple_vocab_16e6.txt[.gz]; first 48,894 merges used).
  static ClipTokenizer from_merges_file(const std::string& path);
  // From a diffusers tokenizer/ folder (vocab.json + merges.txt).
  static ClipTokenizer from_diffusers_dir(const std::string& dir);
  // From a path that is either of the above.
  static ClipTokenizer load(const std::string& path);
  // From in-memory merges text (the uncompressed file content), for tests and fuzzing.
  static ClipTokenizer from_merges_text(std::string_view text, const std::string& label = "<memory>");
  // From in-memory vocab.json + merges.txt content (a diffusers tokenizer/ folder).
  static ClipTokenizer from_diffusers_text(std::string_view vocab_json, std::string_view merges_text,
                                           const std::string& label = "<memory>");

  ClipTokenizer(ClipTokenizer&&) noexcept;
  ClipTokenizer& operator=(ClipTokenizer&&) noexcept;
  ~ClipTokenizer();

  // Content ids (no SOT/EOT, no truncation). Invalid UTF-8 is replaced (U+FFFD), never throws
  // for text content.
  std::vector<std::int32_t> encode(std::string_view text) const;
  // 77 ids with SOT/EOT, truncated to 75 content tokens, padded with pad_id.
  TokenizedPrompt tokenize(std::string_view text, int pad_id = kEot) const;

  int vocab_size() const;  // 49408

  // The ftfy-like normalisation + whitespace collapse + lowercase of SPEC §2 (exposed for tests).
  static std::string normalize(std::string_view text);

  struct Impl;  // opaque (src/tokenizer_internal.h)
  explicit ClipTokenizer(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

// Where to find the tokenizer (SPEC §2): explicit path, the model's tokenizer/ folder,
// $SPEED_ERASE_TOKENIZER, then the installed data dir. Throws with a hint saying where to get the
// file when none is found.
std::string find_tokenizer(const std::optional<std::string>& explicit_path,
                           const std::optional<std::string>& model_tokenizer_dir);

}  // namespace speed
