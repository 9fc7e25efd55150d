// src/tokenizer_internal.h: pieces of the CLIP tokenizer shared by its translation units.
// Text is processed as UTF-32 (std::u32string) between decoding and BPE.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "speed/tokenizer.h"

namespace speed::tok {

// ---- Unicode helpers (tokenizer_unicode.cc), Python 3 semantics ----

// Bytes -> code points as Python's bytes.decode("utf-8", errors="replace"): every maximal
// invalid subpart becomes one U+FFFD (surrogates and overlongs are invalid).
std::u32string decode_utf8(std::string_view bytes);
std::string encode_utf8(std::u32string_view text);
void append_utf8(std::string& out, char32_t c);
// Strict check used for tokenizer files (which Python decodes strictly).
bool is_valid_utf8(std::string_view bytes);

bool is_letter(char32_t c);       // \p{L}
bool is_number(char32_t c);       // \p{N}
bool is_decimal(char32_t c);      // \d of Python's re (Nd)
bool is_space(char32_t c);        // str.isspace(): bidi WS/B/S or category Zs
std::u32string nfc(std::u32string_view text);
std::u32string nfkc_char(char32_t c);
// str.lower(): full case mapping (U+0130 -> "i\u0307") and the final-sigma rule.
std::u32string python_lower(std::u32string_view text);
// re.sub(r"\s+", " ", text).strip()
std::u32string collapse_whitespace(std::u32string_view text);

// ---- ftfy subset (tokenizer_ftfy.cc) ----

// ftfy.fix_text(text) with its default TextFixerConfig.
std::u32string fix_text(std::u32string_view text);

// ---- generated tables (tokenizer_tables.cc) ----

struct HtmlEntity {
  const char* name;   // "&amp;" (sorted by bytes)
  const char* value;  // UTF-8
};
struct InvalidCharref {
  std::uint32_t code;
  char32_t replacement;
};
extern const HtmlEntity kHtmlEntities[];
extern const std::size_t kHtmlEntityCount;
extern const InvalidCharref kInvalidCharrefs[];  // sorted by code
extern const std::size_t kInvalidCharrefCount;
extern const char32_t kInvalidCodepoints[];  // sorted
extern const std::size_t kInvalidCodepointCount;

}  // namespace speed::tok

// ---- the tokenizer state (tokenizer_vocab.cc builds it, tokenizer_bpe.cc uses it) ----

namespace speed::tok {

// (left id, right id) -> merged id, open addressing. The merged id is 512 + merge rank, so a
// smaller merged id is a higher-priority merge.
class PairTable {
 public:
  void reserve(std::size_t n);
  bool insert(std::int32_t left, std::int32_t right, std::int32_t merged);  // false: duplicate
  std::int32_t find(std::int32_t left, std::int32_t right) const {       // -1: no merge
    std::uint64_t key = pack(left, right);
    for (std::size_t i = slot(key);; i = (i + 1) & mask_) {
      if (keys_[i] == key) return values_[i];
      if (keys_[i] == kEmpty) return -1;
    }
  }

 private:
  static constexpr std::uint64_t kEmpty = ~0ull;
  static std::uint64_t pack(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) |
           static_cast<std::uint32_t>(b);
  }
  std::size_t slot(std::uint64_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_) & mask_;
  }
  std::vector<std::uint64_t> keys_;
  std::vector<std::int32_t> values_;
  std::size_t mask_ = 0;
  int shift_ = 64;
};

inline constexpr int kVocabSize = 49408;
inline constexpr int kMergeCount = 48894;
inline constexpr std::size_t kMaxFileBytes = 64u << 20;  // the real files are 1.3 MB (gz) / 1.1 MB (json)

}  // namespace speed::tok

struct speed::ClipTokenizer::Impl {
  std::vector<std::string> tokens;           // id -> token text (bytes_to_unicode form, UTF-8)
  std::array<std::int32_t, 256> byte_id{};  // byte -> id of its one-byte symbol
  tok::PairTable merges;

  // Per-word BPE cache (the same names recur across prompts).
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache;

  // BPE of one pre-tokenised piece (UTF-8 bytes), appended to `out`.
  void bpe(std::string_view piece, std::vector<std::int32_t>& out) const;
  // Content ids of already-normalised text; stops once `limit` ids exist (limit < 0: all).
  void encode_normalized(std::u32string_view text, std::vector<std::int32_t>& out, long limit) const;
};

namespace speed::tok {
// Symbol-level BPE, exposed so tests can check the two algorithms agree.
void bpe_naive(const PairTable& merges, std::vector<std::int32_t>& symbols);
void bpe_heap(const PairTable& merges, std::vector<std::int32_t>& symbols);
// The tokenizer-file parsers (also the fuzz targets' entry points). merge_count is CLIP's 48,894
// except in fuzz_tokenizer_file, which parses with a small vocabulary so that a mutated file can
// be accepted (and vocab.json reached) within a few kB, and each input costs microseconds.
std::unique_ptr<ClipTokenizer::Impl> build_from_merges(std::string_view text, const std::string& label,
                                                       bool diffusers, int merge_count = kMergeCount);
// gzip/zlib data -> bytes, refused once the output exceeds max_bytes.
std::string gunzip(std::string_view data, const std::string& label, std::size_t max_bytes = kMaxFileBytes);
// Checks a diffusers vocab.json against the vocabulary rebuilt from its merges.txt.
void check_vocab_json(std::string_view vocab_json, const ClipTokenizer::Impl& impl, const std::string& label);
}  // namespace speed::tok

namespace speed::tok {
// A single-byte encoding ftfy tries when repairing mojibake: the characters of bytes 0x80..0xFF.
struct SingleByteCodec {
  const char* name;
  bool sloppy;  // undefined bytes pass through; byte 0x1A stands for U+FFFD
  char32_t high[128];
};
extern const SingleByteCodec kCharmapCodecs[];  // in ftfy's CHARMAP_ENCODINGS order
extern const std::size_t kCharmapCodecCount;
}  // namespace speed::tok
