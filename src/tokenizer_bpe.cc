// CLIP tokenisation proper: special-token split, normalisation, CLIP's pre-tokenisation pattern
// with real Unicode classes, byte-level BPE with a per-word cache, SOT/EOT/truncation/padding.
#include <algorithm>
#include <climits>
#include <queue>

#include "speed/error.h"
#include "tokenizer_internal.h"

namespace speed {

namespace tok {

namespace {

constexpr std::size_t kCacheMaxEntries = 1u << 17;
constexpr std::size_t kCacheMaxWordBytes = 128;
// Short words (nearly all) use the simple quadratic loop, which is faster for them than a heap.
constexpr std::size_t kHeapThreshold = 48;

const std::u32string_view kSotText = U"<|startoftext|>";
const std::u32string_view kEotText = U"<|endoftext|>";

bool starts_with(std::u32string_view text, std::size_t i, std::u32string_view prefix) {
  return text.size() - i >= prefix.size() && text.compare(i, prefix.size(), prefix) == 0;
}

// The contraction alternatives 's|'t|'re|'ve|'m|'ll|'d under IGNORECASE (text is lowercase
// already; U+017F LONG S case-folds to 's').
std::size_t contraction_length(std::u32string_view t, std::size_t i) {
  if (t[i] != U'\'' || i + 1 >= t.size()) return 0;
  char32_t a = t[i + 1] == 0x17F ? U's' : t[i + 1];
  char32_t b = i + 2 < t.size() ? t[i + 2] : 0;
  if (a == U's' || a == U't' || a == U'm' || a == U'd') return 2;
  if ((a == U'r' || a == U'v') && b == U'e') return 3;
  if (a == U'l' && b == U'l') return 3;
  return 0;
}

}  // namespace

void bpe_naive(const PairTable& merges, std::vector<std::int32_t>& sym) {
  std::vector<std::int32_t> next;
  while (sym.size() > 1) {
    std::int32_t best = INT32_MAX;
    std::size_t at = 0;
    for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
      std::int32_t m = merges.find(sym[i], sym[i + 1]);
      if (m >= 0 && m < best) best = m, at = i;
    }
    if (best == INT32_MAX) break;
    const std::int32_t a = sym[at], b = sym[at + 1];
    next.clear();
    for (std::size_t i = 0; i < sym.size();) {
      if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
        next.push_back(best);
        i += 2;
      } else {
        next.push_back(sym[i++]);
      }
    }
    sym.swap(next);
  }
}

// O(L log L) BPE for long words: a linked list of symbols and a heap of candidate merges ordered
// by (merged id, position). Equal to bpe_naive because every merge's parts are defined by
// earlier lines (checked at load), so a merge never creates a pair that outranks itself.
void bpe_heap(const PairTable& merges, std::vector<std::int32_t>& sym) {
  const int n = static_cast<int>(sym.size());
  if (n < 2) return;
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
  struct Cand {
    std::int32_t merged;
    int left;
    std::int32_t left_id, right_id;
    bool operator>(const Cand& o) const {
      return merged != o.merged ? merged > o.merged : left > o.left;
    }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    std::int32_t m = merges.find(sym[left], sym[next[left]]);
    if (m >= 0) heap.push({m, left, sym[left], sym[next[left]]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<bool> dead(n, false);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    int l = c.left;
    if (dead[l] || sym[l] != c.left_id) continue;
    int r = next[l];
    if (r < 0 || sym[r] != c.right_id) continue;
    sym[l] = c.merged;
    dead[r] = true;
    next[l] = next[r];
    if (next[r] >= 0) prev[next[r]] = l;
    push(prev[l]);
    push(l);
  }
  std::vector<std::int32_t> out;
  for (int i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
  sym.swap(out);
}

}  // namespace tok

void ClipTokenizer::Impl::bpe(std::string_view piece, std::vector<std::int32_t>& out) const {
  const bool cacheable = piece.size() <= tok::kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(std::string(piece));
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<std::int32_t> sym;
  sym.reserve(piece.size());
  for (unsigned char b : piece) sym.push_back(byte_id[b]);
  sym.back() += 256;  // "</w>" glued to the last symbol
  if (sym.size() <= tok::kHeapThreshold) {
    tok::bpe_naive(merges, sym);
  } else {
    tok::bpe_heap(merges, sym);
  }
  out.insert(out.end(), sym.begin(), sym.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= tok::kCacheMaxEntries) cache.clear();
    cache.emplace(std::string(piece), std::move(sym));
  }
}

// findall(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+)
void ClipTokenizer::Impl::encode_normalized(std::u32string_view t, std::vector<std::int32_t>& out,
                                            long limit) const {
  std::string piece;
  std::size_t i = 0;
  while (i < t.size() && (limit < 0 || static_cast<long>(out.size()) < limit)) {
    char32_t c = t[i];
    std::size_t j = i;
    if (c == U'<' && tok::starts_with(t, i, tok::kSotText)) {
      out.push_back(kSot);
      i += tok::kSotText.size();
      continue;
    }
    if (c == U'<' && tok::starts_with(t, i, tok::kEotText)) {
      out.push_back(kEot);
      i += tok::kEotText.size();
      continue;
    }
    if (std::size_t len = tok::contraction_length(t, i)) {
      j = i + len;
    } else if (tok::is_letter(c)) {
      while (j < t.size() && tok::is_letter(t[j])) ++j;
    } else if (tok::is_number(c)) {
      j = i + 1;
    } else if (!tok::is_space(c)) {
      while (j < t.size() && !tok::is_space(t[j]) && !tok::is_letter(t[j]) && !tok::is_number(t[j])) ++j;
    } else {
      ++i;
      continue;
    }
    piece.clear();
    for (std::size_t k = i; k < j; ++k) tok::append_utf8(piece, t[k]);
    bpe(piece, out);
    i = j;
  }
}

namespace {

// HF's added-token split: the literal special tokens become ids, the text between them is
// normalised and tokenised chunk by chunk.
template <typename Fn>
void for_each_chunk(std::u32string_view text, std::vector<std::int32_t>& out, Fn&& chunk) {
  std::size_t i = 0, start = 0;
  auto flush = [&](std::size_t end) {
    if (end > start) chunk(text.substr(start, end - start));
  };
  while ((i = text.find(U'<', i)) != std::u32string_view::npos) {
    bool sot = tok::starts_with(text, i, tok::kSotText);
    bool eot = !sot && tok::starts_with(text, i, tok::kEotText);
    if (!sot && !eot) {
      ++i;
      continue;
    }
    flush(i);
    out.push_back(sot ? kSot : kEot);
    i += sot ? tok::kSotText.size() : tok::kEotText.size();
    start = i;
  }
  flush(text.size());
}

std::u32string normalize_chunk(std::u32string_view chunk) {
  return tok::python_lower(tok::collapse_whitespace(tok::fix_text(chunk)));
}

}  // namespace

std::string ClipTokenizer::normalize(std::string_view text) {
  return tok::encode_utf8(normalize_chunk(tok::decode_utf8(text)));
}

std::vector<std::int32_t> ClipTokenizer::encode(std::string_view text) const {
  std::vector<std::int32_t> out;
  std::u32string decoded = tok::decode_utf8(text);
  for_each_chunk(decoded, out, [&](std::u32string_view chunk) {
    impl_->encode_normalized(normalize_chunk(chunk), out, -1);
  });
  return out;
}

TokenizedPrompt ClipTokenizer::tokenize(std::string_view text, int pad_id) const {
  SPEED_CHECK(pad_id >= 0 && pad_id < vocab_size(), "pad id {} is out of range 0..{}", pad_id,
              vocab_size() - 1);
  // One id beyond the 75 kept is enough to know the prompt was truncated.
  constexpr long kLimit = kMaxContent + 1;
  std::vector<std::int32_t> content;
  std::u32string decoded = tok::decode_utf8(text);
  for_each_chunk(decoded, content, [&](std::u32string_view chunk) {
    if (static_cast<long>(content.size()) < kLimit) {
      impl_->encode_normalized(normalize_chunk(chunk), content, kLimit);
    }
  });
  TokenizedPrompt p;
  p.truncated = content.size() > static_cast<std::size_t>(kMaxContent);
  const int kept = static_cast<int>(std::min<std::size_t>(content.size(), kMaxContent));
  p.ids.fill(pad_id);
  p.ids[0] = kSot;
  std::copy(content.begin(), content.begin() + kept, p.ids.begin() + 1);
  p.ids[kept + 1] = kEot;
  p.n = kept + 2;
  return p;
}

}  // namespace speed
