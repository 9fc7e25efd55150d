// UTF-8 validation, Python-compatible lower-casing and whole-word search (the reference's
// re.search(r'\b' + re.escape(target.lower()) + r'\b', text.lower())).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "concepts_internal.h"
#include "speed/concepts.h"
#include "speed/error.h"

namespace speed {
namespace detail {

bool in_ranges(const std::uint32_t* ranges, std::size_t count, std::uint32_t cp) {
  std::size_t lo = 0, hi = count;  // binary search over [first, last] pairs
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (cp < ranges[2 * mid])
      hi = mid;
    else if (cp > ranges[2 * mid + 1])
      lo = mid + 1;
    else
      return true;
  }
  return false;
}

std::uint32_t decode_utf8(std::string_view s, std::size_t& i) {
  const auto b = static_cast<unsigned char>(s[i]);
  int len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > s.size()) {
    ++i;
    return b;
  }
  std::uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += len;
  return cp;
}

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

std::string read_file_limited(const std::string& path) {
  // Opened without blocking: a named pipe nobody writes to would otherwise hang the open for
  // good. Reads block again (a pipe's writer, as in `--concepts <(...)`, is already there).
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0)
    fail_hint("check the path, or set --data-dir / $SPEED_ERASE_DATA for the paper's data files",
              "cannot open '{}'", path);
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  const bool pipe = stat_ok && S_ISFIFO(st.st_mode);
  if (!stat_ok || S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail("'{}' is a folder, expected a text file", path);
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  std::FILE* f = ::fdopen(fd, "rb");
  if (!f) {
    ::close(fd);
    fail("cannot open '{}'", path);
  }
  std::string data;
  char buf[65536];
  std::size_t got;
  while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) {
    if (data.size() + got > kMaxConceptFileBytes) {
      std::fclose(f);
      fail("file '{}' is larger than the limit of {} bytes", path, kMaxConceptFileBytes);
    }
    data.append(buf, got);
  }
  const bool err = std::ferror(f) != 0;
  std::fclose(f);
  SPEED_CHECK(!err, "cannot read '{}'", path);
  SPEED_CHECK(!pipe || !data.empty(), "'{}' is a pipe and gave no data (nothing writes to it)",
              path);
  return data;
}

namespace {

std::uint32_t lower_cp(std::uint32_t cp) {
  // Runs are sorted by first code point: find the last run starting at or before cp.
  std::size_t lo = 0, hi = kLowerRunCount;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (static_cast<std::uint32_t>(kLowerRuns[4 * mid]) <= cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo == 0) return cp;
  const std::int32_t* r = kLowerRuns + 4 * (lo - 1);
  const std::uint32_t first = static_cast<std::uint32_t>(r[0]),
                      count = static_cast<std::uint32_t>(r[1]),
                      stride = static_cast<std::uint32_t>(r[2]);
  const std::uint32_t off = cp - first;
  if (off % stride != 0 || off / stride >= count) return cp;
  return static_cast<std::uint32_t>(static_cast<std::int64_t>(cp) + r[3]);
}

bool is_cased(std::uint32_t cp) { return detail::in_ranges(kCasedRanges, kCasedRangeCount, cp); }
bool is_case_ignorable(std::uint32_t cp) {
  return detail::in_ranges(kCaseIgnorableRanges, kCaseIgnorableRangeCount, cp);
}

}  // namespace
}  // namespace detail

bool is_valid_utf8(std::string_view s, std::size_t* error_offset) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    std::size_t len;
    std::uint32_t min;
    if (b < 0x80)
      len = 1, min = 0;
    else if ((b >> 5) == 6)
      len = 2, min = 0x80;
    else if ((b >> 4) == 14)
      len = 3, min = 0x800;
    else if ((b >> 3) == 30)
      len = 4, min = 0x10000;
    else
      len = 0, min = 0;
    bool ok = len > 0 && i + len <= s.size();
    std::uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    for (std::size_t k = 1; ok && k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      ok = (c & 0xC0) == 0x80;
      cp = (cp << 6) | (c & 0x3F);
    }
    // Overlong forms, surrogates and code points beyond U+10FFFF are invalid (RFC 3629).
    if (!ok || cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) {
      if (error_offset) *error_offset = i;
      return false;
    }
    i += len;
  }
  return true;
}

std::string lower_text(std::string_view s) {
  std::vector<std::uint32_t> cps;
  cps.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) cps.push_back(detail::decode_utf8(s, i));
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < cps.size(); ++i) {
    const std::uint32_t cp = cps[i];
    if (cp == 0x130) {  // İ -> i + combining dot above (SpecialCasing, as str.lower())
      out += 'i';
      detail::append_utf8(out, 0x307);
      continue;
    }
    if (cp == 0x3A3) {  // Σ: final sigma when preceded by a cased letter and not followed by one
      std::size_t j = i;
      bool before = false, after = false;
      while (j > 0) {
        const std::uint32_t c = cps[--j];
        if (detail::is_case_ignorable(c)) continue;
        before = detail::is_cased(c);
        break;
      }
      for (j = i + 1; j < cps.size(); ++j) {
        if (detail::is_case_ignorable(cps[j])) continue;
        after = detail::is_cased(cps[j]);
        break;
      }
      detail::append_utf8(out, before && !after ? 0x3C2 : 0x3C3);
      continue;
    }
    detail::append_utf8(out, detail::lower_cp(cp));
  }
  return out;
}

bool contains_whole_word(std::string_view text, std::string_view word) {
  // \b at a position: exactly one of the neighbouring code points is a word character (a
  // missing neighbour is not one), as in Python's re for str patterns.
  auto word_before = [&](std::size_t pos) {
    if (pos == 0) return false;
    std::size_t start = pos - 1;
    while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
    std::size_t k = start;
    return detail::is_word_char(detail::decode_utf8(text, k));
  };
  auto word_at = [&](std::size_t pos) {
    if (pos >= text.size()) return false;
    std::size_t k = pos;
    return detail::is_word_char(detail::decode_utf8(text, k));
  };
  auto boundary = [&](std::size_t pos) { return word_before(pos) != word_at(pos); };
  if (word.empty()) {  // r'\b\b': any boundary
    for (std::size_t pos = 0; pos <= text.size(); ++pos)
      if ((pos == text.size() || (static_cast<unsigned char>(text[pos]) & 0xC0) != 0x80) &&
          boundary(pos))
        return true;
    return false;
  }
  for (std::size_t pos = text.find(word); pos != std::string_view::npos;
       pos = text.find(word, pos + 1)) {
    if ((static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) continue;  // not a code point start
    if (boundary(pos) && boundary(pos + word.size())) return true;
  }
  return false;
}

}  // namespace speed
