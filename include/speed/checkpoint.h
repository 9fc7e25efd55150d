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

#include "speed/safetensors.h"

namespace speed {

enum class Family { SD1, SD2, SDXL };
enum class Layout { SingleFile, UNetOnly, Diffusers };
enum class TextNaming { HF, OpenCLIP };  // HF CLIPTextModel keys vs OpenCLIP fused in_proj
enum class Activation { QuickGELU, GELU };

const char* family_name(Family f);  // "sd1", "sd2", "sdxl"
const char* layout_name(Layout l);  // "single-file", "unet-only", "diffusers"

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

  const SafeTensors& file(std::size_t i) const { return *files.at(i).st; }
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

}  // namespace speed
