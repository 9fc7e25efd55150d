// The subset of ftfy 6.x fix_text() that CLIP prompts go through (SPEC §2): HTML entities
// (only in "\n"-segments before the first '<'), C1 controls, Latin ligatures, character width,
// curly quotes, line breaks, terminal escapes, control characters, NFC; repeated until the
// text stops changing, as ftfy's fix_and_explain does. Mojibake repair is in
// tokenizer_mojibake.cc.
#include <algorithm>
#include <array>
#include <cstring>

#include "tokenizer_internal.h"

namespace speed::tok {

std::u32string fix_encoding(std::u32string_view text);  // tokenizer_mojibake.cc

namespace {

// ftfy runs fix_and_explain until a fixed point. Real prompts settle in 2-3 rounds; the cap only
// bounds hostile input such as "&amp;amp;amp;..." (one level per round).
constexpr int kMaxRounds = 64;

bool is_alnum_ascii(char32_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

const HtmlEntity* find_entity(std::string_view name) {
  const HtmlEntity* begin = kHtmlEntities;
  const HtmlEntity* end = kHtmlEntities + kHtmlEntityCount;
  auto it = std::lower_bound(begin, end, name, [](const HtmlEntity& e, std::string_view n) {
    return std::string_view(e.name) < n;
  });
  return it != end && std::string_view(it->name) == name ? it : nullptr;
}

// html.unescape() of a whole "&#<digits>;" or "&#x<hex>;" reference: the code point list it
// yields, or nullopt-like false when Python would leave a ';' behind (ftfy then keeps the text).
bool unescape_charref(std::u32string_view ref, std::u32string& out) {
  std::u32string_view body = ref.substr(2, ref.size() - 3);  // between "&#" and ";"
  bool hex = !body.empty() && (body[0] == 'x' || body[0] == 'X');
  std::u32string_view digits = hex ? body.substr(1) : body;
  if (digits.empty()) return false;
  unsigned long long num = 0;
  bool overflow = false;
  for (char32_t c : digits) {
    unsigned v;
    if (c >= '0' && c <= '9') {
      v = c - '0';
    } else if (hex && ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')) {
      v = (c | 0x20) - 'a' + 10;
    } else {
      return false;  // html.unescape stops early and leaves the ';'
    }
    if (num > 0x10FFFFull * 16) overflow = true;
    if (!overflow) num = num * (hex ? 16 : 10) + v;
  }
  if (overflow) num = 0x110000;
  for (std::size_t i = 0; i < kInvalidCharrefCount; ++i) {
    if (kInvalidCharrefs[i].code == num) {
      out.assign(1, kInvalidCharrefs[i].replacement);
      return true;
    }
  }
  if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) {
    out.assign(1, 0xFFFD);
  } else if (std::binary_search(kInvalidCodepoints, kInvalidCodepoints + kInvalidCodepointCount,
                                static_cast<char32_t>(num))) {
    out.clear();
  } else {
    out.assign(1, static_cast<char32_t>(num));
  }
  return out.find(U';') == std::u32string::npos;
}

// ftfy.fixes.unescape_html: re.sub(r"&#?[0-9A-Za-z]{1,24};", fixup, text).
std::u32string unescape_html(std::u32string_view text) {
  if (text.find(U'&') == std::u32string_view::npos) return std::u32string(text);
  std::u32string out;
  out.reserve(text.size());
  std::size_t i = 0;
  std::u32string decoded;
  while (i < text.size()) {
    if (text[i] != U'&') {
      out.push_back(text[i++]);
      continue;
    }
    std::size_t j = i + 1;
    if (j < text.size() && text[j] == U'#') ++j;
    std::size_t k = j;
    while (k < text.size() && k - j < 25 && is_alnum_ascii(text[k])) ++k;
    bool match = k > j && k - j <= 24 && k < text.size() && text[k] == U';';
    if (!match) {
      out.push_back(text[i++]);
      continue;
    }
    std::u32string_view ref = text.substr(i, k + 1 - i);
    std::string name(ref.begin(), ref.end());  // ASCII by construction
    if (const HtmlEntity* e = find_entity(name)) {
      out += decode_utf8(e->value);
    } else if (j > i + 1 && unescape_charref(ref, decoded)) {
      out += decoded;
    } else {
      out += ref;
    }
    i = k + 1;
  }
  return out;
}

// Windows-1252 for 0x80..0x9F; the five unassigned bytes stay as the C1 code point ("sloppy").
constexpr std::array<char32_t, 32> kCp1252High = {
    0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0x008D, 0x017D, 0x008F, 0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178};

struct Ligature {
  char32_t from;
  const char32_t* to;
};
constexpr Ligature kLigatures[] = {
    {0x132, U"IJ"}, {0x133, U"ij"}, {0x149, U"\u02BCn"}, {0x1F1, U"DZ"}, {0x1F2, U"Dz"},
    {0x1F3, U"dz"}, {0x1C4, U"D\u017D"}, {0x1C5, U"D\u017E"}, {0x1C6, U"d\u017E"},
    {0x1C7, U"LJ"}, {0x1C8, U"Lj"}, {0x1C9, U"lj"}, {0x1CA, U"NJ"}, {0x1CB, U"Nj"},
    {0x1CC, U"nj"}, {0xFB00, U"ff"}, {0xFB01, U"fi"}, {0xFB02, U"fl"}, {0xFB03, U"ffi"},
    {0xFB04, U"ffl"}, {0xFB05, U"\u017Ft"}, {0xFB06, U"st"}};

// WIDTH_MAP: U+3000 -> ' ', and U+FF01..U+FFEF -> NFKC(c) where that differs.
const std::array<std::u32string, 0xFFF0 - 0xFF01>& width_map() {
  static const auto table = [] {
    std::array<std::u32string, 0xFFF0 - 0xFF01> t;
    for (char32_t c = 0xFF01; c < 0xFFF0; ++c) {
      std::u32string alt = nfkc_char(c);
      if (alt != std::u32string(1, c)) t[c - 0xFF01] = alt;
    }
    return t;
  }();
  return table;
}

bool is_removed_control(char32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F ||
         (c >= 0x206A && c <= 0x206F) || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
}

// fix_c1_controls, fix_latin_ligatures, fix_character_width, uncurl_quotes: all per character
// and independent of each other's output (no rule produces another rule's input), so one pass.
std::u32string map_chars(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  const auto& widths = width_map();
  for (char32_t c : text) {
    if (c >= 0x80 && c <= 0x9F) c = kCp1252High[c - 0x80];
    if ((c >= 0x132 && c <= 0x149) || (c >= 0x1C4 && c <= 0x1F3) || (c >= 0xFB00 && c <= 0xFB06)) {
      bool done = false;
      for (const auto& l : kLigatures) {
        if (l.from == c) {
          for (const char32_t* p = l.to; *p; ++p) {
            char32_t d = *p == 0x2BC ? U'\'' : *p;  // uncurl_quotes runs after the ligatures
            out.push_back(d);
          }
          done = true;
          break;
        }
      }
      if (done) continue;
    }
    if (c == 0x3000) {
      out.push_back(U' ');
      continue;
    }
    if (c >= 0xFF01 && c < 0xFFF0 && !widths[c - 0xFF01].empty()) {
      for (char32_t d : widths[c - 0xFF01]) {
        if (d >= 0x201C && d <= 0x201F) d = U'"';
        if (d == 0x2BC || (d >= 0x2018 && d <= 0x201B)) d = U'\'';
        out.push_back(d);
      }
      continue;
    }
    if (c >= 0x201C && c <= 0x201F) c = U'"';
    if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) c = U'\'';
    out.push_back(c);
  }
  return out;
}

std::u32string fix_line_breaks(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    char32_t c = text[i];
    if (c == U'\r') {
      if (i + 1 < text.size() && text[i + 1] == U'\n') ++i;
      out.push_back(U'\n');
    } else if (c == 0x2028 || c == 0x2029 || c == 0x85) {
      out.push_back(U'\n');
    } else {
      out.push_back(c);
    }
  }
  return out;
}

// remove_terminal_escapes (ESC '[' (\d|;)* [A-Za-z]) then remove_control_chars.
std::u32string remove_escapes_and_controls(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == 0x1B && i + 1 < text.size() && text[i + 1] == U'[') {
      std::size_t j = i + 2;
      while (j < text.size() && (is_decimal(text[j]) || text[j] == U';')) ++j;
      if (j < text.size() && text[j] < 0x80 && ((text[j] | 0x20) >= 'a' && (text[j] | 0x20) <= 'z')) {
        i = j;
        continue;
      }
    }
    if (!is_removed_control(text[i])) out.push_back(text[i]);
  }
  return out;
}

std::u32string fix_segment(std::u32string text, bool unescape) {
  for (int round = 0; round < kMaxRounds; ++round) {
    std::u32string orig = text;
    if (unescape) text = unescape_html(text);
    text = fix_encoding(text);
    text = map_chars(text);
    text = fix_line_breaks(text);
    text = remove_escapes_and_controls(text);
    text = nfc(text);
    if (text == orig) break;
  }
  return text;
}

}  // namespace

std::u32string fix_text(std::u32string_view text) {
  // Printable ASCII without '&' is a fixed point of every step (most prompts): skip the rounds.
  bool plain = true;
  for (char32_t c : text) plain = plain && ((c >= 0x20 && c < 0x7F && c != U'&') || c == U'\n' || c == U'\t');
  if (plain) return std::u32string(text);
  std::u32string out;
  out.reserve(text.size());
  bool unescape = true;  // "auto": switched off for good at the first segment holding '<'
  constexpr std::size_t kMaxDecodeLength = 1000000;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t brk = text.find(U'\n', pos);
    brk = brk == std::u32string_view::npos ? text.size() : brk + 1;
    brk = std::min(brk, pos + kMaxDecodeLength);
    std::u32string_view segment = text.substr(pos, brk - pos);
    if (unescape && segment.find(U'<') != std::u32string_view::npos) unescape = false;
    out += fix_segment(std::u32string(segment), unescape);
    pos = brk;
  }
  return out;
}

}  // namespace speed::tok
