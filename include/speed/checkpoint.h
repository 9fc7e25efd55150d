// speed/checkpoint.h: checkpoint layouts as data (reference/formats.md §2, §3.1, §5, §7).
//
// Detects the family (SD 1.x, SD 2.x, SDXL) and the layout (single file, bare UNet file,
// diffusers folder) from tensor names and shapes only, never from tensor data, and lists the
// cross-attention K/V tensors with their source and canonical (diffusers) names.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "speed/safetensors.h"

namespace speed {

enum class Family { SD1, SD2, SDXL };
enum class Layout { SingleFile, UNetOnly, Diffusers };
enum class TextNaming { HF, OpenCLIP };  // HF CLIPTextModel keys vs OpenCLIP fused in_proj
enum class Activation { QuickGELU, GELU };

const char* family_name(Family f);  // "sd1", "sd2", "sdxl"
const char* layout_name(Layout l);  // "single-file", "unet-only", "diffusers"
const char* naming_name(TextNaming n);      // "hf", "openclip"
const char* activation_name(Activation a);  // "quick_gelu", "gelu"

// One cross-attention projection to edit (an attn2.to_k or attn2.to_v weight).
struct KVLayer {
  std::string canonical;  // diffusers UNet name, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight
  std::string source;     // the key in its file (e.g. model.diffusion_model.input_blocks.1.1....)
  std::size_t file = 0;   // index into Checkpoint::files
  bool is_key = false;    // to_k (true) or to_v (false)
  std::int64_t out = 0, in = 0;
  Dtype dtype = Dtype::F32;
  std::optional<std::string> ema_twin;  // model_ema.<dotless name> in the same file, if present
};

struct TextEncoderInfo {
  std::string prefix;        // e.g. "cond_stage_model.transformer.text_model." or "text_model."
  std::size_t file = 0;      // index into Checkpoint::files
  TextNaming naming = TextNaming::HF;
  std::int64_t vocab = 49408, positions = 77, width = 768, layers = 12, heads = 12, mlp = 3072;
  Activation activation = Activation::QuickGELU;
  int pad_id = 49407;           // 49407 for CLIP-L (SD1, SDXL enc 0), 0 for OpenCLIP (SD2, SDXL enc 1)
  int output_layer = -1;        // layers to run (-1 = all); SD2 penultimate, SDXL layer 11 / 31
  bool final_layer_norm = true; // SD1/SD2 yes, SDXL no
  bool has_projection = false;
  std::string projection_key;                // the projection tensor's key, when has_projection
  std::optional<std::string> config_path;    // diffusers text_encoder*/config.json, if read
  std::optional<std::string> tokenizer_dir;  // diffusers tokenizer/ or tokenizer_2/, if present
};

struct CheckpointFile {
  std::string path;     // the file on disk
  std::string role;     // "checkpoint", "unet", "text_encoder", "text_encoder_2"
  std::shared_ptr<const SafeTensors> st;
};

struct Checkpoint {
  std::string path;  // what the user named (file or folder)
  Family family = Family::SD1;
  Layout layout = Layout::SingleFile;
  std::vector<CheckpointFile> files;
  std::vector<KVLayer> kv;  // in the reference's layer order: down_blocks, up_blocks, mid_block; to_k before to_v
  std::vector<TextEncoderInfo> text_encoders;  // 0, 1 (SD1/SD2) or 2 (SDXL)
  std::int64_t context_dim = 768;
  std::optional<std::string> tokenizer_dir;    // diffusers tokenizer/ folder if present
  bool has_ema = false;
  std::size_t ema_tensors = 0;  // model_ema.* tensors (all of them, twins or not)

  std::string unet_naming = "ldm";  // "ldm" or "diffusers": how the UNet keys are spelled
  std::string unet_prefix;          // e.g. "model.diffusion_model." ("" for bare / diffusers)
  std::string variant;              // diffusers weight variant ("fp16") or ""
  std::optional<std::string> unet_index;  // diffusers sharded index (.safetensors.index.json)
  std::vector<std::string> detection;     // how the family was decided (one line per clue)

  const SafeTensors& file(std::size_t i) const { return *files.at(i).st; }
  std::size_t kv_layers() const { return kv.size() / 2; }  // attention blocks (16 SD1/SD2, 70 SDXL)
};

// Opens and detects a checkpoint: a .safetensors file (single-file or bare UNet) or a diffusers
// folder (unet/, text_encoder/, text_encoder_2/, tokenizer*/, fp16 variants, sharded index).
// Unknown or inconsistent inputs throw speed::Error saying what was found.
Checkpoint open_checkpoint(const std::string& path);

// Detects from an already-opened single safetensors file (used by tests and fuzzing).
Checkpoint detect_checkpoint(std::shared_ptr<const SafeTensors> st, const std::string& path);

// LDM block name <-> diffusers block name (e.g. "input_blocks.1.1" <-> "down_blocks.0.attentions.0").
std::optional<std::string> ldm_to_diffusers_block(const std::string& ldm_block);
std::optional<std::string> diffusers_to_ldm_block(const std::string& diffusers_block);

// LitEma's twin name of a single-file UNet key: "model_ema." + the key without its first
// component and without dots (model.diffusion_model.a.1.b -> model_ema.diffusion_modela1b).
std::string ema_twin_name(const std::string& source_key);

// What `speed-erase inspect` prints: a stable JSON description (ordered keys) and a
// human-readable rendering of the same facts.
nlohmann::ordered_json describe_checkpoint(const Checkpoint& ckpt);
std::string describe_checkpoint_text(const Checkpoint& ckpt);

}  // namespace speed
