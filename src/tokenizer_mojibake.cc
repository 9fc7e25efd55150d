// ftfy 6.x fix_encoding: text that looks like mojibake (ftfy.badness.is_bad) and that encodes in
// one of ftfy's single-byte codecs to valid UTF-8 is re-decoded, e.g. "SchrÃ¶dinger" ->
// "Schrödinger", "â€œhiâ€\x9d" -> "“hi”"; Latin-1 C1 controls are read as Windows-1252.
// Not ported: decode_inconsistent_utf8 (repair of mojibake islands inside otherwise unencodable
// text); such text is left as it is.
#include <initializer_list>
#include <optional>
#include <vector>

#include "tokenizer_internal.h"

namespace speed::tok {

namespace {

using Set = std::vector<std::pair<char32_t, char32_t>>;

Set set(std::initializer_list<std::pair<char32_t, char32_t>> ranges) { return Set(ranges); }
Set chars(std::u32string_view s) {
  Set out;
  for (char32_t c : s) out.push_back({c, c});
  return out;
}
Set operator+(Set a, const Set& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
bool contains(const Set& s, char32_t c) {
  for (const auto& [lo, hi] : s) {
    if (c >= lo && c <= hi) return true;
  }
  return false;
}

// ftfy.badness.MOJIBAKE_CATEGORIES
struct Categories {
  Set common = chars(U"\u00A0\u00AD\u00B7\u00B4\u2013\u2014\u2015\u2026\u2019");
  Set c1 = set({{0x80, 0x9F}});
  Set bad = chars(U"\u00A6\u00A4\u00A8\u00AC\u00AF\u00B8\u0192\u02C6\u02C7\u02D8\u02DB\u02DC\u2020\u2021"
                  U"\u2030\u2310\u25CA\uFFFD\u00AA\u00BA");
  Set law = chars(U"\u00B6\u00A7");
  Set currency = chars(U"\u00A2\u00A3\u00A5\u20A7\u20AC");
  Set start = chars(U"\u00A1\u00AB\u00BF\u00A9\u0384\u0385\u2018\u201A\u201C\u201E\u2022\u2039\uF8FF");
  Set end = chars(U"\u00AE\u00BB\u02DD\u201D\u203A\u2122");
  Set numeric = chars(U"\u00B2\u00B3\u00B9\u00B1\u00BC\u00BD\u00BE\u00D7\u00B5\u00F7\u2044\u2202\u2206\u220F"
                      U"\u2211\u221A\u221E\u2229\u222B\u2248\u2260\u2261\u2264\u2265\u2116");
  Set kaomoji = set({{0xD2, 0xD6}, {0xD9, 0xDC}, {0xF2, 0xF6}, {0xF8, 0xFC}}) +
                chars(U"\u0150\u014C\u016A\u0172\u00B0");
  Set upper_acc = set({{0xC0, 0xD1}}) +
                  chars(U"\u00D8\u00DC\u00DD\u0102\u0100\u0104\u0106\u010C\u010E\u0110\u0118\u011A\u0112"
                        U"\u0116\u011E\u0122\u0130\u012A\u0136\u0139\u013D\u0141\u013B\u0143\u0147\u0145"
                        U"\u0152\u0158\u015A\u015E\u0160\u0162\u0164\u016E\u0170\u0178\u0179\u017B\u017D"
                        U"\u0490");
  Set lower_acc = chars(U"\u00DF") + set({{0xE0, 0xF1}}) +
                  chars(U"\u0103\u0105\u0101\u0107\u010D\u010F\u0111\u0119\u011B\u0113\u0117\u011F\u0123"
                        U"\u012F\u012B\u0137\u013A\u013E\u0142\u013C\u0153\u0155\u015B\u015F\u0161\u0165"
                        U"\u00FC\u017A\u017C\u017E\u0491\uFB01\uFB02");
  Set upper_common = chars(U"\u00DE\u0386\u0388\u0389\u038A\u038C\u038E\u038F\u03AA\u03AB") +
                     set({{0x391, 0x3A9}, {0x401, 0x42F}});
  Set lower_common = set({{0x3B1, 0x3C9}, {0x430, 0x45F}}) + chars(U"\u03AC\u03AD\u03AE\u03AF\u03B0");
  Set box = chars(U"\u2502\u250C\u2510\u2518\u251C\u2524\u252C\u253C\u2580\u2584\u2588\u258C\u2590\u2591"
                  U"\u2592\u2593") + set({{0x2550, 0x256C}});
};

// One element of a BADNESS_RE alternative: a set, or one of the regex escapes it uses.
struct Elem {
  enum Kind { kSet, kSpace, kWord, kAny, kNotAsciiLetter } kind = kSet;
  Set s;
  bool match(char32_t c) const {
    switch (kind) {
      case kSet: return contains(s, c);
      case kSpace: return is_space(c);
      case kWord: return is_letter(c) || is_number(c) || c == U'_';
      case kAny: return c != U'\n';
      case kNotAsciiLetter: return !(c < 0x80 && ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'));
    }
    return false;
  }
};
struct Alternative {
  bool anchored = false;  // '^'
  std::vector<Elem> elems;
  bool ascii_start = true;  // whether the first element can match an ASCII character
};

Elem E(Set s) { return Elem{Elem::kSet, std::move(s)}; }
Elem K(Elem::Kind k) { return Elem{k, {}}; }

// ftfy.badness.BADNESS_RE: every alternative is a fixed-length sequence, so a search is a scan
// of positions x alternatives.
const std::vector<Alternative>& badness_alternatives() {
  static const std::vector<Alternative> alts = [] {
    Categories c;
    const Set az = set({{'a', 'z'}}), azAZ = set({{'a', 'z'}, {'A', 'Z'}});
    std::vector<Alternative> a;
      auto add = [&](std::vector<Elem> e, bool anchored = false) {
      bool ascii = e[0].kind != Elem::kSet;
      for (const auto& r : e[0].s) ascii = ascii || r.first < 0x80;
      a.push_back({anchored, std::move(e), ascii});
    };
    add({E(c.c1)});
    add({E(c.bad + c.lower_acc + c.upper_acc + c.box + c.start + c.end + c.currency + c.numeric + c.law), E(c.bad)});
    add({E(azAZ), E(c.lower_common + c.upper_common), E(c.bad)});
    add({E(c.bad), E(c.lower_acc + c.upper_acc + c.box + c.start + c.end + c.currency + c.numeric + c.law)});
    add({E(c.lower_acc + c.lower_common + c.box + c.end + c.currency + c.numeric), E(c.upper_acc)});
    add({E(c.box + c.end + c.currency + c.numeric), E(c.lower_acc)});
    add({E(c.lower_acc + c.box + c.end), E(c.currency)});
    add({K(Elem::kSpace), E(c.upper_acc), E(c.currency)});
    add({E(c.upper_acc + c.box), E(c.numeric + c.law)});
    add({E(c.lower_acc + c.upper_acc + c.box + c.currency + c.end), E(c.start), E(c.numeric)});
    add({E(c.lower_acc + c.upper_acc + c.currency + c.numeric + c.box + c.law), E(c.end), E(c.start)});
    add({E(c.currency + c.numeric + c.box), E(c.start)});
    add({E(az), E(c.upper_acc), E(c.start + c.currency)});
    add({E(c.box), E(c.kaomoji)});
    add({E(c.lower_acc + c.upper_acc + c.currency + c.numeric + c.start + c.end + c.law), E(c.box)});
    add({E(c.box), E(c.end)});
    add({E(c.lower_acc + c.upper_acc), E(c.start + c.end), K(Elem::kWord)});
    add({E(chars(U"\u0152\u0153")), K(Elem::kNotAsciiLetter)});
    add({E(c.upper_acc), E(chars(U"\u00B0"))});
    add({E(chars(U"\u00C2\u00C3\u00CE\u00D0")),
         E(chars(U"\u20AC\u0153\u0160\u0161\u00A2\u00A3\u0178\u017E\u00A0\u00AD\u00AE\u00A9\u00B0\u00B7\u00BB"
                 U"\u2013\u2014\u00B4") + c.start + c.end)});
    add({E(chars(U"\u00D7")), E(chars(U"\u00B2\u00B3"))});
    const Set arabic = c.common + c.currency + c.bad + c.numeric + c.start + chars(U"\u0178\u0160\u00AE\u00B0\u00B5\u00BB");
    add({E(chars(U"\u00D8\u00D9")), E(arabic), E(chars(U"\u00D8\u00D9")), E(arabic)});
    add({E(chars(U"\u00E0")), E(chars(U"\u00B2\u00B5\u00B9\u00BC\u00BD\u00BE"))});
    add({E(chars(U"\u221A")), E(chars(U"\u00B1\u2202\u2020\u2260\u00AE\u2122\u00B4\u2264\u2265\u00A5\u00B5\u00F8"))});
    add({E(chars(U"\u2248")), E(chars(U"\u00B0\u00A2"))});
    add({E(chars(U"\u201A")), E(chars(U"\u00C4")),
         E(chars(U"\u00EC\u00EE\u00EF\u00F2\u00F4\u00FA\u00F9\u00FB\u2020\u00B0\u00A2\u03C0"))});
    add({E(chars(U"\u201A")), E(chars(U"\u00E2\u00F3")), E(chars(U"\u00E0\u00E4\u00B0\u00EA"))});
    add({E(chars(U"\u0432")), E(chars(U"\u0402"))});
    const Set vgrs = chars(U"\u0412\u0413\u0420\u0421");
    add({E(vgrs), E(c.c1 + c.bad + c.start + c.end + c.currency + chars(U"\u00B0\u00B5")), E(vgrs)});
    add({E(chars(U"\u0413")), E(chars(U"\u045E")), E(chars(U"\u0412")), E(chars(U"\u0402")), E(chars(U"\u0412")),
         K(Elem::kAny), E(azAZ + chars(U" "))});
    add({E(chars(U"\u00C3")), E(chars(U"\u00A0\u00A1"))});
    add({E(az), E(chars(U"\u00C3\u00C2")), E(chars(U" "))});
    add({E(az), K(Elem::kSpace), E(chars(U"\u00C3\u00C2")), E(chars(U" "))});
    add({E(chars(U"\u00C3\u00C2")), E(chars(U" "))}, true);
    add({E(az + chars(U".,?!") + c.end), E(chars(U"\u00C2")), E(chars(U" ") + c.start + c.end)});
    add({E(chars(U"\u03B2")), E(chars(U"\u20AC")), E(chars(U"\u2122\u00A0\u0386\u00AD\u00AE\u00B0"))});
    const Set greek = chars(U"\u0392\u0393\u039E\u039F");
    add({E(greek), E(c.c1 + c.bad + c.start + c.end + c.currency + chars(U"\u00B0")), E(greek)});
    add({E(chars(U"\u0101")), E(chars(U"\u20AC"))});
    return a;
  }();
  return alts;
}

bool is_bad(std::u32string_view t) {
  const auto& alts = badness_alternatives();
  for (std::size_t i = 0; i < t.size(); ++i) {
    for (const auto& alt : alts) {
      if ((alt.anchored && i != 0) || (t[i] < 0x80 && !alt.ascii_start)) continue;
      if (t.size() - i < alt.elems.size()) continue;
      bool ok = true;
      for (std::size_t k = 0; ok && k < alt.elems.size(); ++k) ok = alt.elems[k].match(t[i + k]);
      if (ok) return true;
    }
  }
  return false;
}

// text.encode(codec), or nullopt when a character has no byte there.
std::optional<std::string> encode_single_byte(std::u32string_view t, const SingleByteCodec& codec) {
  std::string out;
  out.reserve(t.size());
  for (char32_t c : t) {
    if (c < 0x80 && !(codec.sloppy && c == 0x1A)) {
      out.push_back(static_cast<char>(c));
      continue;
    }
    if (codec.sloppy && c == 0xFFFD) {
      out.push_back('\x1A');
      continue;
    }
    int b = -1;
    for (int k = 0; k < 128 && b < 0; ++k) {
      if (codec.high[k] == c) b = 0x80 + k;
    }
    if (b < 0) return std::nullopt;
    out.push_back(static_cast<char>(b));
  }
  return out;
}

bool cont(unsigned char b) { return b >= 0x80 && b <= 0xBF; }

// fixes.restore_byte_a0: "\xc3 " not before " |quele|quela|quilo|s " gets its A0 back, then
// ALTERED_UTF8_RE sequences have their spaces turned into A0.
std::string restore_byte_a0(const std::string& in) {
  std::string s;
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (static_cast<unsigned char>(in[i]) == 0xC3 && i + 1 < in.size() && in[i + 1] == ' ') {
      std::string_view rest = std::string_view(in).substr(i + 2);
      bool excluded = false;
      for (std::string_view w : {" ", "quele", "quela", "quilo", "s "}) excluded = excluded || rest.substr(0, w.size()) == w;
      if (!excluded) {
        s += "\xc3\xa0 ";
        ++i;
        continue;
      }
    }
    s.push_back(in[i]);
  }
  std::string out;
  auto u = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  auto cont3 = [](unsigned char b) { return (b >= 0x80 && b <= 0x84) || (b >= 0x86 && b <= 0x9F) || (b >= 0xA1 && b <= 0xBF); };
  for (std::size_t i = 0; i < s.size();) {
    unsigned char b = u(i);
    std::size_t left = s.size() - i;
    if ((b == 0xC2 || b == 0xC3 || b == 0xC5 || b == 0xCE || b == 0xD0 || b == 0xD9) && left >= 2 && s[i + 1] == ' ') {
      out += static_cast<char>(b), out += '\xa0', i += 2;
    } else if ((b == 0xE2 || b == 0xE3) && left >= 3 && s[i + 1] == ' ' && cont3(u(i + 2))) {
      out += static_cast<char>(b), out += '\xa0', out += s[i + 2], i += 3;
    } else if (b >= 0xE0 && b <= 0xE3 && left >= 3 && cont3(u(i + 1)) && s[i + 2] == ' ') {
      out += static_cast<char>(b), out += s[i + 1], out += '\xa0', i += 3;
    } else if (b == 0xF0 && left >= 4 &&
               ((s[i + 1] == ' ' && cont(u(i + 2)) && cont(u(i + 3))) ||
                (cont(u(i + 1)) && s[i + 2] == ' ' && cont(u(i + 3))) ||
                (cont(u(i + 1)) && cont(u(i + 2)) && s[i + 3] == ' '))) {
      for (int k = 0; k < 4; ++k) out += s[i + k] == ' ' ? '\xa0' : s[i + k];
      i += 4;
    } else {
      out += s[i++];
    }
  }
  return out;
}

// fixes.replace_lossy_sequences: UTF-8 sequences with a lost byte (0x1A, sometimes '?') -> U+FFFD.
std::string replace_lossy_sequences(const std::string& s) {
  std::string out;
  auto u = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  auto x = [](unsigned char b) { return b == 0x1A; };
  auto xq = [](unsigned char b) { return b == 0x1A || b == '?'; };
  auto xc = [](unsigned char b) { return b == 0x1A || (b >= 0x80 && b <= 0xBF); };
  auto xqc = [](unsigned char b) { return b == 0x1A || b == '?' || (b >= 0x80 && b <= 0xBF); };
  for (std::size_t i = 0; i < s.size();) {
    unsigned char b = u(i);
    std::size_t left = s.size() - i, len = 0;
    if (b >= 0xC2 && b <= 0xDF && left >= 2 && x(u(i + 1))) {
      len = 2;
    } else if ((b == 0xC2 || b == 0xC3) && left >= 2 && s[i + 1] == '?') {
      len = 2;
    } else if (b == 0xED && left >= 6 && u(i + 1) >= 0xA0 && u(i + 1) <= 0xAF && u(i + 3) == 0xED &&
               u(i + 4) >= 0xB0 && u(i + 4) <= 0xBF &&
               ((xq(u(i + 2)) && xqc(u(i + 5))) || (xqc(u(i + 2)) && xq(u(i + 5))))) {
      len = 6;
    } else if (b >= 0xE0 && b <= 0xEF && left >= 3 &&
               ((xq(u(i + 1)) && xc(u(i + 2))) || (xc(u(i + 1)) && xq(u(i + 2))))) {
      len = 3;
    } else if (b >= 0xF0 && b <= 0xF4 && left >= 4 &&
               ((xq(u(i + 1)) && xc(u(i + 2)) && xc(u(i + 3))) || (xc(u(i + 1)) && xq(u(i + 2)) && xc(u(i + 3))) ||
                (xc(u(i + 1)) && xc(u(i + 2)) && xq(u(i + 3))))) {
      len = 4;
    } else if (x(b)) {
      len = 1;
    }
    if (len) {
      out += "\xef\xbf\xbd";
      i += len;
    } else {
      out += s[i++];
    }
  }
  return out;
}

// Strict UTF-8, or ftfy's "utf-8-variants" (CESU-8 surrogate pairs, C0 80 for NUL).
std::optional<std::u32string> decode_utf8_strict(const std::string& s, bool variants) {
  std::u32string out;
  for (std::size_t i = 0; i < s.size();) {
    auto u = [&](std::size_t k) { return k < s.size() ? static_cast<unsigned char>(s[k]) : 0; };
    if (variants && u(i) == 0xC0 && u(i + 1) == 0x80) {
      out.push_back(0), i += 2;
      continue;
    }
    if (variants && u(i) == 0xED && u(i + 1) >= 0xA0 && u(i + 1) <= 0xAF && cont(u(i + 2)) && u(i + 3) == 0xED &&
        u(i + 4) >= 0xB0 && u(i + 4) <= 0xBF && cont(u(i + 5))) {
      char32_t hi = 0xD000 | ((u(i + 1) & 0x3F) << 6) | (u(i + 2) & 0x3F);
      char32_t lo = 0xD000 | ((u(i + 4) & 0x3F) << 6) | (u(i + 5) & 0x3F);
      out.push_back(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00));
      i += 6;
      continue;
    }
    std::size_t len = u(i) < 0x80 ? 1 : u(i) < 0xE0 ? 2 : u(i) < 0xF0 ? 3 : 4;
    if (i + len > s.size()) return std::nullopt;
    std::u32string one = decode_utf8(std::string_view(s).substr(i, len));
    if (one.size() != 1 || (one[0] == 0xFFFD && s.compare(i, len, "\xef\xbf\xbd") != 0)) return std::nullopt;
    out.push_back(one[0]);
    i += len;
  }
  return out;
}

std::u32string fix_one_step(std::u32string_view t) {
  bool ascii = true;
  for (char32_t c : t) ascii = ascii && c < 0x80;
  if (t.empty() || ascii || !is_bad(t)) return std::u32string(t);
  std::vector<std::string> possible;
  for (std::size_t e = 0; e < kCharmapCodecCount; ++e) {
    const SingleByteCodec& codec = kCharmapCodecs[e];
    auto encoded = encode_single_byte(t, codec);
    if (!encoded) continue;
    possible.push_back(codec.name);
    std::string bytes = restore_byte_a0(*encoded);
    if (codec.sloppy) bytes = replace_lossy_sequences(bytes);
    bool variants = bytes.find('\xed') != std::string::npos || bytes.find('\xc0') != std::string::npos;
    if (auto fixed = decode_utf8_strict(bytes, variants)) return *fixed;
  }
  bool latin1 = !possible.empty() && possible[0] == std::string("latin-1");
  if (latin1) {
    // encode("latin-1").decode("windows-1252"), strict: the five undefined bytes fail it.
    std::u32string fixed;
    bool ok = true;
    for (char32_t c : t) {
      if (c >= 0x80 && c <= 0x9F) {
        char32_t d = kCharmapCodecs[1].high[c - 0x80];
        ok = ok && d != c;
        fixed.push_back(d);
      } else {
        fixed.push_back(c);
      }
    }
    if (ok && fixed != t) return fixed;
  }
  // fix_c1_controls, as a step of its own (the loop then looks at the result again).
  std::u32string fixed(t);
  for (char32_t& c : fixed) {
    if (c >= 0x80 && c <= 0x9F) c = kCharmapCodecs[1].high[c - 0x80];
  }
  return fixed;
}

}  // namespace

std::u32string fix_encoding(std::u32string_view text) {
  std::u32string cur(text);
  for (int round = 0; round < 16; ++round) {
    std::u32string next = fix_one_step(cur);
    if (next == cur) break;
    cur = std::move(next);
  }
  return cur;
}

}  // namespace speed::tok
