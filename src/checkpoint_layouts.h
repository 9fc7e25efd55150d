// Internal: the layout tables (names are data) shared by detection, describe and synth.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "speed/checkpoint.h"

namespace speed::layouts {

enum class BlockNaming { Ldm, Diffusers };

// How a file may spell its UNet keys; detection picks the row with the most K/V matches.
struct UNetSpelling {
  const char* prefix;
  BlockNaming naming;
};
inline constexpr UNetSpelling kUNetSpellings[] = {
    {"model.diffusion_model.", BlockNaming::Ldm},  // LDM / SGM single files
    {"diffusion_model.", BlockNaming::Ldm},        // ComfyUI component files
    {"", BlockNaming::Ldm},                        // bare LDM UNet
    {"", BlockNaming::Diffusers},                  // diffusers UNet (unet/*.safetensors)
};

// Key spellings of the two text-encoder weight layouts (relative to an encoder's prefix).
struct TextNamingRow {
  TextNaming naming;
  const char* token_embedding;
  const char* position_embedding;
  const char* layer_prefix;  // followed by "<i>."
  const char* fc1;           // relative to a layer
  const char* attention;     // a per-layer tensor that must exist (relative to a layer)
  const char* final_norm;
};
inline constexpr TextNamingRow kTextNamings[] = {
    {TextNaming::HF, "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
     "encoder.layers.", "mlp.fc1.weight", "self_attn.k_proj.weight", "final_layer_norm.weight"},
    {TextNaming::OpenCLIP, "token_embedding.weight", "positional_embedding", "transformer.resblocks.",
     "mlp.c_fc.weight", "attn.in_proj_weight", "ln_final.weight"},
};
const TextNamingRow& text_naming(TextNaming n);

// Where single files keep their text encoders, and which family each spelling implies.
struct TextEncoderSpelling {
  const char* prefix;
  TextNaming naming;
  Family family;
  int slot;  // 0, or 1 for SDXL's second encoder
  const char* what;
};
inline constexpr TextEncoderSpelling kTextEncoderSpellings[] = {
    {"cond_stage_model.transformer.text_model.", TextNaming::HF, Family::SD1, 0, "CLIP-L (ldm)"},
    {"cond_stage_model.transformer.", TextNaming::HF, Family::SD1, 0, "CLIP-L (ldm, old names without text_model.)"},
    {"cond_stage_model.model.", TextNaming::OpenCLIP, Family::SD2, 0, "OpenCLIP-H (ldm)"},
    {"conditioner.embedders.0.model.", TextNaming::OpenCLIP, Family::SD2, 0, "OpenCLIP-H (sgm)"},
    {"conditioner.embedders.0.transformer.text_model.", TextNaming::HF, Family::SDXL, 0, "CLIP-L (sgm)"},
    {"conditioner.embedders.1.model.", TextNaming::OpenCLIP, Family::SDXL, 1, "OpenCLIP-bigG (sgm)"},
};

// Per-family facts (reference/formats.md §2.1, §3.2, §3.3).
struct FamilyTextRow {
  Activation activation;
  int pad_id;
  int skip_last;  // layers not run at the end (1 = penultimate), for full-depth encoders
  bool final_layer_norm;
};
struct FamilyRow {
  Family family;
  std::int64_t context_dim;  // of the real model (fallback clue only; tiny files differ)
  int text_encoders;
  FamilyTextRow text[2];
  bool linear_proj_in;     // proj_in is Linear (2-D) rather than a 1x1 conv (4-D)
  bool first_level_attention;
};
inline constexpr FamilyRow kFamilies[] = {
    {Family::SD1, 768, 1, {{Activation::QuickGELU, 49407, 0, true}, {}}, false, true},
    {Family::SD2, 1024, 1, {{Activation::GELU, 0, 1, true}, {}}, true, true},
    {Family::SDXL, 2048, 2, {{Activation::QuickGELU, 49407, 1, false}, {Activation::GELU, 0, 1, false}}, true, false},
};
const FamilyRow& family_row(Family f);

// A parsed K/V key: block kind (0 down, 1 up, 2 mid, the reference's order), indices, k or v.
struct KVKey {
  int kind = 0;
  int block = 0;
  int attention = 0;
  int transformer = 0;
  bool is_key = true;
  std::string canonical;  // diffusers name
};
// `rest` is the key after the UNet prefix. nullopt when it is not an attn2.to_k/to_v weight;
// sets `unmapped` when it is one but its block is not a transformer position.
std::optional<KVKey> parse_kv_key(std::string_view rest, BlockNaming naming, bool* unmapped = nullptr);

// Parses "<block>." (either naming) off the front of `s` into kind/block/attention;
// `transformer_position` is false for slots that cannot hold a transformer (downsamplers).
bool eat_block(std::string_view& s, BlockNaming naming, int& kind, int& block, int& attention,
               bool& transformer_position);
std::string diffusers_block(int kind, int block, int attention);

// Strict decimal (no sign, no leading zeros, at most 9 digits).
std::optional<int> parse_index(std::string_view s);

}  // namespace speed::layouts
