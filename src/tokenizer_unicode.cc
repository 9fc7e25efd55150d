// Unicode helpers with Python 3 semantics, on top of utf8proc (categories, NFC, case mapping).
#include <cstdlib>
#include <memory>

#include <utf8proc.h>

#include "tokenizer_internal.h"

namespace speed::tok {

namespace {

constexpr char32_t kReplacement = 0xFFFD;

bool in(unsigned char b, unsigned lo, unsigned hi) { return b >= lo && b <= hi; }

utf8proc_category_t category(char32_t c) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(c));
}

// Unicode "Cased" (Lu, Ll, Lt, Other_Lowercase, Other_Uppercase), for the final-sigma rule.
bool is_cased(char32_t c) {
  auto cat = category(c);
  if (cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT)
    return true;
  // Other_Lowercase / Other_Uppercase ranges (PropList.txt), the ones that matter in practice.
  static const char32_t kRanges[][2] = {
      {0xAA, 0xAA},     {0xBA, 0xBA},     {0x2B0, 0x2B8},   {0x2C0, 0x2C1},   {0x2E0, 0x2E4},
      {0x345, 0x345},   {0x37A, 0x37A},   {0x10FC, 0x10FC}, {0x1D2C, 0x1D6A}, {0x1D78, 0x1D78},
      {0x1D9B, 0x1DBF}, {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2160, 0x217F},
      {0x24B6, 0x24E9}, {0x2C7C, 0x2C7D}, {0xA69C, 0xA69D}, {0xA770, 0xA770}, {0xA7F8, 0xA7F9},
      {0xAB5C, 0xAB5F}, {0x1F130, 0x1F149}, {0x1F150, 0x1F169}, {0x1F170, 0x1F189}};
  for (const auto& r : kRanges) {
    if (c >= r[0] && c <= r[1]) return true;
  }
  return false;
}

// Unicode "Case_Ignorable": Mn, Me, Cf, Lm, Sk, and Word_Break MidLetter/MidNumLet/Single_Quote.
bool is_case_ignorable(char32_t c) {
  switch (category(c)) {
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_SK:
      return true;
    default:
      break;
  }
  switch (c) {
    case 0x27: case 0x2E: case 0x3A: case 0x5E: case 0x60: case 0xA8: case 0xAD: case 0xAF:
    case 0xB4: case 0xB7: case 0xB8: case 0x387: case 0x55F: case 0x5F4: case 0x2018:
    case 0x2019: case 0x2024: case 0x2027: case 0xFE13: case 0xFE52: case 0xFE55: case 0xFF07:
    case 0xFF0E: case 0xFF1A:
      return true;
    default:
      return false;
  }
}

std::u32string utf8proc_map_u32(std::u32string_view text, int options) {
  std::string utf8 = encode_utf8(text);
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(utf8.data()),
                                      static_cast<utf8proc_ssize_t>(utf8.size()), &out,
                                      static_cast<utf8proc_option_t>(options));
  if (len < 0) {  // cannot happen for valid UTF-8 without REJECTNA; keep the text unchanged
    std::free(out);
    return std::u32string(text);
  }
  std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> guard(out, &std::free);
  return decode_utf8(std::string_view(reinterpret_cast<const char*>(out), static_cast<std::size_t>(len)));
}

}  // namespace

std::u32string decode_utf8(std::string_view bytes) {
  std::u32string out;
  out.reserve(bytes.size());
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::size_t i = 0;
  while (i < n) {
    unsigned char b = s[i];
    if (b < 0x80) {
      out.push_back(b);
      ++i;
      continue;
    }
    int need = 0;
    char32_t cp = 0;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (in(b, 0xC2, 0xDF)) {
      need = 1, cp = b & 0x1F;
    } else if (in(b, 0xE0, 0xEF)) {
      need = 2, cp = b & 0x0F;
      if (b == 0xE0) lo = 0xA0;
      if (b == 0xED) hi = 0x9F;  // no surrogates
    } else if (in(b, 0xF0, 0xF4)) {
      need = 3, cp = b & 0x07;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;
    } else {
      out.push_back(kReplacement);
      ++i;
      continue;
    }
    std::size_t j = i + 1;
    bool ok = true;
    for (int k = 0; k < need; ++k, ++j) {
      unsigned l = k == 0 ? lo : 0x80, h = k == 0 ? hi : 0xBF;
      if (j >= n || !in(s[j], l, h)) {
        ok = false;
        break;
      }
      cp = (cp << 6) | (s[j] & 0x3F);
    }
    // A broken sequence is replaced by one U+FFFD covering its valid prefix (maximal subpart);
    // the offending byte starts the next round.
    out.push_back(ok ? cp : kReplacement);
    i = j;
  }
  return out;
}

bool is_valid_utf8(std::string_view bytes) {
  std::u32string decoded = decode_utf8(bytes);
  for (char32_t c : decoded) {
    if (c == kReplacement) {
      // Distinguish a literal U+FFFD (EF BF BD) from a replacement.
      return encode_utf8(decoded) == bytes;
    }
  }
  return true;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string encode_utf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text) append_utf8(out, c);
  return out;
}

bool is_letter(char32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  switch (category(c)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return true;
    default:
      return false;
  }
}

bool is_number(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  auto cat = category(c);
  return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool is_decimal(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  return category(c) == UTF8PROC_CATEGORY_ND;
}

bool is_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
  if (c > 0x10FFFF) return false;
  if (category(c) == UTF8PROC_CATEGORY_ZS) return true;
  auto bidi = utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->bidi_class;
  return bidi == UTF8PROC_BIDI_CLASS_WS || bidi == UTF8PROC_BIDI_CLASS_B ||
         bidi == UTF8PROC_BIDI_CLASS_S;
}

std::u32string nfc(std::u32string_view text) {
  bool ascii = true;
  for (char32_t c : text) ascii = ascii && c < 0x80;
  if (ascii) return std::u32string(text);
  return utf8proc_map_u32(text, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
}

std::u32string nfkc_char(char32_t c) {
  return utf8proc_map_u32(std::u32string_view(&c, 1),
                          UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
}

std::u32string python_lower(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    char32_t c = text[i];
    if (c < 0x80) {
      out.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
    } else if (c == 0x130) {  // the one unconditional multi-character lowercase (SpecialCasing)
      out.push_back(U'i');
      out.push_back(0x307);
    } else if (c == 0x3A3) {
      // CPython's handle_capital_sigma: final form after a cased letter (skipping
      // case-ignorables) when no cased letter follows.
      std::size_t j = i;
      bool final_sigma = false;
      while (j > 0 && is_case_ignorable(text[j - 1])) --j;
      final_sigma = j > 0 && is_cased(text[j - 1]);
      if (final_sigma) {
        std::size_t k = i + 1;
        while (k < text.size() && is_case_ignorable(text[k])) ++k;
        final_sigma = k == text.size() || !is_cased(text[k]);
      }
      out.push_back(final_sigma ? 0x3C2 : 0x3C3);
    } else if (c <= 0x10FFFF) {
      out.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::u32string collapse_whitespace(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (char32_t c : text) {
    if (is_space(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out.push_back(U' ');
    pending_space = false;
    out.push_back(c);
  }
  return out;
}

}  // namespace speed::tok
