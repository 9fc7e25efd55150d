// Loading and validating CLIP tokenizer files: bpe_simple_vocab_16e6.txt(.gz) and diffusers
// tokenizer/ folders (vocab.json + merges.txt). Inputs are hostile (SPEC §6): sizes are capped,
// every line is checked, and the vocabulary must be exactly the one CLIP's code rebuilds.
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include "speed/error.h"
#include "speed/log.h"
#include "tokenizer_internal.h"

namespace speed {

namespace tok {

namespace {

constexpr std::size_t kMaxLineBytes = 1024;       // the longest real merge line is 34 bytes

std::string read_file_limited(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    throw Error(fmt::format("cannot open {} '{}'", what, path),
                "check the path given with --tokenizer or $SPEED_ERASE_TOKENIZER");
  }
  f.seekg(0, std::ios::end);
  auto size = static_cast<std::streamoff>(f.tellg());
  SPEED_CHECK(size >= 0, "cannot read {} '{}'", what, path);
  SPEED_CHECK(static_cast<std::size_t>(size) <= kMaxFileBytes,
              "{} '{}' is {} bytes, expected at most {}", what, path, size, kMaxFileBytes);
  f.seekg(0);
  std::string data(static_cast<std::size_t>(size), '\0');
  f.read(data.data(), size);
  SPEED_CHECK(f.gcount() == size, "cannot read {} '{}'", what, path);
  return data;
}

// bytes_to_unicode() order: printable bytes first, then the other 68 mapped to U+0100...
std::array<std::pair<unsigned, char32_t>, 256> byte_symbols() {
  std::array<std::pair<unsigned, char32_t>, 256> out{};
  int k = 0;
  auto printable = [](unsigned b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  };
  for (unsigned b = 0; b < 256; ++b) {
    if (printable(b)) out[k++] = {b, static_cast<char32_t>(b)};
  }
  char32_t next = 256;
  for (unsigned b = 0; b < 256; ++b) {
    if (!printable(b)) out[k++] = {b, next++};
  }
  return out;
}

std::string printable(std::string_view s) {
  std::string out;
  for (unsigned char c : s.substr(0, 64)) {
    if (c < 0x20 || c == 0x7F) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (s.size() > 64) out += "...";
  return out;
}

}  // namespace

std::string gunzip(std::string_view data, const std::string& label, std::size_t max_bytes) {
  z_stream zs{};
  SPEED_CHECK(inflateInit2(&zs, 15 + 32) == Z_OK, "cannot initialise zlib for '{}'", label);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  std::string out;
  char buf[1 << 16];
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof(buf);
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) {
      inflateEnd(&zs);
      fail("tokenizer file '{}' is not valid gzip data (zlib: {})", label,
           rc == Z_BUF_ERROR ? "truncated" : (zs.msg ? zs.msg : "error"));
    }
    out.append(buf, sizeof(buf) - zs.avail_out);
    if (out.size() > max_bytes) {
      inflateEnd(&zs);
      fail("tokenizer file '{}' decompresses to more than {} bytes", label, max_bytes);
    }
  }
  inflateEnd(&zs);
  return out;
}

void PairTable::reserve(std::size_t n) {
  std::size_t cap = 16;
  int bits = 4;
  while (cap < 2 * n) cap <<= 1, ++bits;
  keys_.assign(cap, kEmpty);
  values_.assign(cap, -1);
  mask_ = cap - 1;
  shift_ = 64 - bits;
}

bool PairTable::insert(std::int32_t left, std::int32_t right, std::int32_t merged) {
  std::uint64_t key = pack(left, right);
  for (std::size_t i = slot(key);; i = (i + 1) & mask_) {
    if (keys_[i] == key) return false;
    if (keys_[i] == kEmpty) {
      keys_[i] = key;
      values_[i] = merged;
      return true;
    }
  }
}

// Rebuilds CLIP's vocabulary from merges text: the header line, then merge_count (CLIP: 48,894)
// "left right" lines (later lines are ignored, as every CLIP implementation does).
std::unique_ptr<ClipTokenizer::Impl> build_from_merges(std::string_view text, const std::string& label,
                                                       bool diffusers, int merge_count) {
  SPEED_CHECK(text.size() <= kMaxFileBytes, "tokenizer file '{}' is {} bytes, expected at most {}",
              label, text.size(), kMaxFileBytes);
  auto impl = std::make_unique<ClipTokenizer::Impl>();
  const std::size_t vocab = 512 + static_cast<std::size_t>(merge_count) + 2;
  impl->tokens.reserve(vocab);
  std::unordered_map<std::string, std::int32_t> ids;
  ids.reserve(vocab * 2);
  for (const auto& [byte, cp] : byte_symbols()) {
    impl->byte_id[byte] = static_cast<std::int32_t>(impl->tokens.size());
    std::string s;
    append_utf8(s, cp);
    impl->tokens.push_back(s);
  }
  for (int i = 0; i < 256; ++i) impl->tokens.push_back(impl->tokens[i] + "</w>");
  for (std::int32_t i = 0; i < 512; ++i) ids.emplace(impl->tokens[i], i);
  impl->merges.reserve(static_cast<std::size_t>(merge_count));

  std::size_t pos = 0;
  std::size_t line_no = 0;  // 1-based number of the line being read
  auto next_line = [&](std::string_view& line) {
    if (pos > text.size()) return false;
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    return true;
  };
  std::string_view line;
  SPEED_CHECK(next_line(line) && !text.empty(), "tokenizer file '{}' is empty", label);
  if (diffusers) {
    SPEED_CHECK(line.substr(0, 8) == "#version",
                "merges file '{}' starts with '{}', expected a '#version' line", label, printable(line));
  }
  for (int rank = 0; rank < merge_count; ++rank) {
    if (!next_line(line) || (pos > text.size() && line.empty())) {
      fail("tokenizer file '{}' has {} merges, expected at least {}", label, rank, merge_count);
    }
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    SPEED_CHECK(line.size() <= kMaxLineBytes, "tokenizer file '{}' line {} is {} bytes, expected at most {}",
                label, line_no, line.size(), kMaxLineBytes);
    SPEED_CHECK(is_valid_utf8(line), "tokenizer file '{}' line {} is not valid UTF-8", label, line_no);
    std::size_t sp = line.find(' ');
    bool ok = sp != std::string_view::npos && sp > 0 && sp + 1 < line.size();
    if (ok) {
      for (char32_t c : decode_utf8(line)) ok = ok && !(is_space(c) && c != U' ');
      ok = ok && line.find(' ', sp + 1) == std::string_view::npos;
    }
    SPEED_CHECK(ok, "tokenizer file '{}' line {} is '{}', expected two tokens separated by one space",
                label, line_no, printable(line));
    std::string left(line.substr(0, sp)), right(line.substr(sp + 1));
    auto l = ids.find(left), r = ids.find(right);
    if (l == ids.end() || r == ids.end()) {
      fail("tokenizer file '{}' line {} merges '{}', which no earlier line defines", label, line_no,
           printable(l == ids.end() ? left : right));
    }
    std::int32_t id = 512 + rank;
    std::string merged = left + right;
    SPEED_CHECK(ids.emplace(merged, id).second,
                "tokenizer file '{}' line {} defines token '{}' again", label, line_no, printable(merged));
    SPEED_CHECK(impl->merges.insert(l->second, r->second, id),
                "tokenizer file '{}' line {} repeats merge '{}'", label, line_no, printable(line));
    impl->tokens.push_back(std::move(merged));
  }
  impl->tokens.emplace_back("<|startoftext|>");
  impl->tokens.emplace_back("<|endoftext|>");
  return impl;
}

// vocab.json of a diffusers tokenizer/ folder must be exactly the vocabulary rebuilt from its
// merges.txt (same tokens, same ids): a mismatch means the two files do not belong together.
void check_vocab_json(std::string_view vocab_json, const ClipTokenizer::Impl& impl, const std::string& label) {
  const std::string vlabel = label + "/vocab.json";
  SPEED_CHECK(vocab_json.size() <= kMaxFileBytes, "'{}' is {} bytes, expected at most {}", vlabel,
              vocab_json.size(), kMaxFileBytes);
  nlohmann::json vocab = nlohmann::json::parse(vocab_json, nullptr, false);
  SPEED_CHECK(!vocab.is_discarded(), "'{}' is not valid JSON", vlabel);
  SPEED_CHECK(vocab.is_object(), "'{}' is not a JSON object of token -> id", vlabel);
  SPEED_CHECK(vocab.size() == impl.tokens.size(), "'{}' has {} entries, expected {}", vlabel,
              vocab.size(), impl.tokens.size());
  std::unordered_map<std::string_view, std::int32_t> rebuilt;
  rebuilt.reserve(impl.tokens.size() * 2);
  for (std::size_t i = 0; i < impl.tokens.size(); ++i) {
    rebuilt.emplace(impl.tokens[i], static_cast<std::int32_t>(i));
  }
  for (const auto& [token, value] : vocab.items()) {
    SPEED_CHECK(value.is_number_integer(), "'{}' maps '{}' to a non-integer", vlabel, printable(token));
    auto id = value.get<std::int64_t>();
    SPEED_CHECK(id >= 0 && id < static_cast<std::int64_t>(impl.tokens.size()),
                "'{}' maps '{}' to id {}, expected 0..{}", vlabel, printable(token), id,
                impl.tokens.size() - 1);
    auto it = rebuilt.find(token);
    SPEED_CHECK(it != rebuilt.end(), "'{}' has token '{}', which merges.txt does not define", vlabel,
                printable(token));
    SPEED_CHECK(it->second == id, "'{}' maps '{}' to id {}, expected {} (rebuilt from merges.txt)",
                vlabel, printable(token), id, it->second);
  }
}

}  // namespace tok

ClipTokenizer::ClipTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ClipTokenizer::ClipTokenizer(ClipTokenizer&&) noexcept = default;
ClipTokenizer& ClipTokenizer::operator=(ClipTokenizer&&) noexcept = default;
ClipTokenizer::~ClipTokenizer() = default;

int ClipTokenizer::vocab_size() const { return static_cast<int>(impl_->tokens.size()); }

ClipTokenizer ClipTokenizer::from_merges_text(std::string_view text, const std::string& label) {
  return ClipTokenizer(tok::build_from_merges(text, label, false));
}

ClipTokenizer ClipTokenizer::from_merges_file(const std::string& path) {
  std::string data = tok::read_file_limited(path, "tokenizer file");
  if (data.size() >= 2 && static_cast<unsigned char>(data[0]) == 0x1F &&
      static_cast<unsigned char>(data[1]) == 0x8B) {
    data = tok::gunzip(data, path);
  }
  ClipTokenizer t = from_merges_text(data, path);
  log().debug("tokenizer: {} ({} tokens)", path, t.vocab_size());
  return t;
}

ClipTokenizer ClipTokenizer::from_diffusers_text(std::string_view vocab_json, std::string_view merges_text,
                                                 const std::string& label) {
  auto impl = tok::build_from_merges(merges_text, label + "/merges.txt", true);
  tok::check_vocab_json(vocab_json, *impl, label);
  return ClipTokenizer(std::move(impl));
}

ClipTokenizer ClipTokenizer::from_diffusers_dir(const std::string& dir) {
  std::string vocab = tok::read_file_limited(dir + "/vocab.json", "tokenizer file");
  std::string merges = tok::read_file_limited(dir + "/merges.txt", "tokenizer file");
  ClipTokenizer t = from_diffusers_text(vocab, merges, dir);
  log().debug("tokenizer: {} (diffusers, {} tokens)", dir, t.vocab_size());
  return t;
}

namespace {
bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace

ClipTokenizer ClipTokenizer::load(const std::string& path) {
  if (is_dir(path)) {
    if (is_file(path + "/vocab.json")) return from_diffusers_dir(path);
    if (is_file(path + "/tokenizer/vocab.json")) return from_diffusers_dir(path + "/tokenizer");
    fail_hint("give the CLIP merges file (bpe_simple_vocab_16e6.txt.gz) or a diffusers tokenizer/ folder",
              "tokenizer folder '{}' has no vocab.json", path);
  }
  return from_merges_file(path);
}

std::string find_tokenizer(const std::optional<std::string>& explicit_path,
                           const std::optional<std::string>& model_tokenizer_dir) {
  auto exists = [](const std::string& p) { return is_file(p) || is_dir(p); };
  if (explicit_path && !explicit_path->empty()) {
    SPEED_CHECK(exists(*explicit_path), "tokenizer '{}' does not exist", *explicit_path);
    return *explicit_path;
  }
  if (model_tokenizer_dir && is_file(*model_tokenizer_dir + "/vocab.json") &&
      is_file(*model_tokenizer_dir + "/merges.txt")) {
    return *model_tokenizer_dir;
  }
  if (const char* env = std::getenv("SPEED_ERASE_TOKENIZER"); env && *env) {
    SPEED_CHECK(exists(env), "tokenizer '{}' (from $SPEED_ERASE_TOKENIZER) does not exist", env);
    return env;
  }
  std::string installed = std::string(SPEED_DATA_DIR) + "/clip/bpe_simple_vocab_16e6.txt.gz";
  if (is_file(installed)) return installed;
  fail_hint(
      "download https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz and pass it "
      "with --tokenizer, set $SPEED_ERASE_TOKENIZER, or install it as '" + installed + "'",
      "no CLIP tokenizer found (no --tokenizer, no tokenizer/ folder beside the model, no "
      "$SPEED_ERASE_TOKENIZER, no '{}')", installed);
}

}  // namespace speed
