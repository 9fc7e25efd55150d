// Layout tables and the LDM <-> diffusers naming rule (reference/formats.md §2.2).
#include "checkpoint_layouts.h"

#include <fmt/format.h>

#include "speed/error.h"

namespace speed {

const char* family_name(Family f) {
  switch (f) {
    case Family::SD1: return "sd1";
    case Family::SD2: return "sd2";
    case Family::SDXL: return "sdxl";
  }
  return "?";
}

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::SingleFile: return "single-file";
    case Layout::UNetOnly: return "unet-only";
    case Layout::Diffusers: return "diffusers";
  }
  return "?";
}

const char* naming_name(TextNaming n) { return n == TextNaming::HF ? "hf" : "openclip"; }
const char* activation_name(Activation a) { return a == Activation::QuickGELU ? "quick_gelu" : "gelu"; }

std::string ema_twin_name(const std::string& source_key) {
  auto dot = source_key.find('.');
  std::string rest = dot == std::string::npos ? source_key : source_key.substr(dot + 1);
  std::string out = "model_ema.";
  for (char c : rest) {
    if (c != '.') out += c;
  }
  return out;
}

namespace layouts {

const TextNamingRow& text_naming(TextNaming n) {
  for (const auto& r : kTextNamings) {
    if (r.naming == n) return r;
  }
  fail("invalid text naming");
}

const FamilyRow& family_row(Family f) {
  for (const auto& r : kFamilies) {
    if (r.family == f) return r;
  }
  fail("invalid family");
}

std::optional<int> parse_index(std::string_view s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return std::nullopt;
  int v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + (c - '0');
  }
  return v;
}

namespace {

bool eat(std::string_view& s, std::string_view lit) {
  if (s.substr(0, lit.size()) != lit) return false;
  s.remove_prefix(lit.size());
  return true;
}

std::optional<int> eat_index(std::string_view& s) {
  auto dot = s.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  auto v = parse_index(s.substr(0, dot));
  if (v) s.remove_prefix(dot + 1);
  return v;
}

}  // namespace

// Parses "<block>." in either naming into (kind, block, attention); false if not a block.
bool eat_block(std::string_view& s, BlockNaming naming, int& kind, int& block, int& attention,
               bool& transformer_position) {
  transformer_position = true;
  if (naming == BlockNaming::Ldm) {
    if (eat(s, "input_blocks.")) {
      auto i = eat_index(s);
      if (!i || !eat(s, "1.")) return false;
      if (*i < 1 || (*i - 1) % 3 == 2) transformer_position = false;
      kind = 0;
      block = (*i - 1) / 3;
      attention = (*i - 1) % 3;
      return true;
    }
    if (eat(s, "middle_block.1.")) {
      kind = 2;
      block = attention = 0;
      return true;
    }
    if (eat(s, "output_blocks.")) {
      auto i = eat_index(s);
      if (!i || !eat(s, "1.")) return false;
      kind = 1;
      block = *i / 3;
      attention = *i % 3;
      return true;
    }
    return false;
  }
  const bool down = eat(s, "down_blocks.");
  if (down || eat(s, "up_blocks.")) {
    kind = down ? 0 : 1;
    auto b = eat_index(s);
    if (!b || !eat(s, "attentions.")) return false;
    auto a = eat_index(s);
    if (!a) return false;
    block = *b;
    attention = *a;
    return true;
  }
  if (eat(s, "mid_block.attentions.")) {
    auto a = eat_index(s);
    if (!a) return false;
    if (*a != 0) transformer_position = false;
    kind = 2;
    block = 0;
    attention = *a;
    return true;
  }
  return false;
}

std::string diffusers_block(int kind, int block, int attention) {
  if (kind == 2) return "mid_block.attentions.0";
  return fmt::format("{}.{}.attentions.{}", kind == 0 ? "down_blocks" : "up_blocks", block, attention);
}

std::optional<KVKey> parse_kv_key(std::string_view rest, BlockNaming naming, bool* unmapped) {
  KVKey k;
  bool transformer_position = true;
  k.kind = -1;
  if (!eat_block(rest, naming, k.kind, k.block, k.attention, transformer_position)) return std::nullopt;
  if (!eat(rest, "transformer_blocks.")) return std::nullopt;
  auto t = eat_index(rest);
  if (!t) return std::nullopt;
  k.transformer = *t;
  if (rest == "attn2.to_k.weight") {
    k.is_key = true;
  } else if (rest == "attn2.to_v.weight") {
    k.is_key = false;
  } else {
    return std::nullopt;
  }
  if (!transformer_position) {
    if (unmapped) *unmapped = true;
    return std::nullopt;
  }
  k.canonical = fmt::format("{}.transformer_blocks.{}.attn2.{}.weight", diffusers_block(k.kind, k.block, k.attention),
                            k.transformer, k.is_key ? "to_k" : "to_v");
  return k;
}

}  // namespace layouts

std::optional<std::string> ldm_to_diffusers_block(const std::string& ldm_block) {
  std::string probe = ldm_block + ".";
  std::string_view p = probe;
  int kind = -1, block = 0, attention = 0;
  bool transformer_position = true;
  if (!layouts::eat_block(p, layouts::BlockNaming::Ldm, kind, block, attention, transformer_position) ||
      !p.empty() || !transformer_position) {
    return std::nullopt;
  }
  return layouts::diffusers_block(kind, block, attention);
}

std::optional<std::string> diffusers_to_ldm_block(const std::string& diffusers_block) {
  std::string probe = diffusers_block + ".";
  std::string_view p = probe;
  int kind = -1, block = 0, attention = 0;
  bool transformer_position = true;
  if (!layouts::eat_block(p, layouts::BlockNaming::Diffusers, kind, block, attention, transformer_position) ||
      !p.empty() || !transformer_position) {
    return std::nullopt;
  }
  if (kind == 2) return std::string("middle_block.1");
  // layers_per_block = 2 in every family: 3 input slots per level (2 + downsample), 3 output slots.
  if (kind == 0) {
    if (attention > 1 || block > 100000) return std::nullopt;
    return fmt::format("input_blocks.{}.1", 3 * block + attention + 1);
  }
  if (attention > 2 || block > 100000) return std::nullopt;
  return fmt::format("output_blocks.{}.1", 3 * block + attention);
}

}  // namespace speed
