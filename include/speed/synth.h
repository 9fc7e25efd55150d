// speed/synth.h: seeded synthetic checkpoints for tests and benchmarks.
//
// Every layout speed-erase reads can be generated: single files (SD1/SD2/SDXL LDM names with
// the family's text-encoder prefixes and naming, optional EMA twins, the old SD1 text names),
// bare UNet files (LDM or diffusers names) and diffusers folders (optional fp16 variant and
// sharded UNet). Tiny geometry by default (channels 32/64/128, SDXL 16/32/64 with its real 70
// cross-attention layers, 64-wide text encoders of 2-3 layers); `full_size`
// uses the real SD shapes (e.g. SD 1.4: C = 320/640/1280, CLIP-L 768 x 12) for benchmarks.
// The same options and seed always give the same bytes.
#pragma once

#include <cstdint>
#include <string>

#include "speed/checkpoint.h"
#include "speed/safetensors.h"

namespace speed {

enum class SynthLayout {
  SingleFile,     // model.diffusion_model.* + text encoder(s) (+ first_stage_model stub)
  UNetLDM,        // bare LDM UNet keys (input_blocks.*), no text encoder
  UNetDiffusers,  // bare diffusers UNet keys (down_blocks.*), no text encoder
  Diffusers,      // a folder: unet/, text_encoder/ (+ text_encoder_2/), tokenizer*/ stubs
};

struct SynthOptions {
  Family family = Family::SD1;
  SynthLayout layout = SynthLayout::SingleFile;
  Dtype dtype = Dtype::F32;      // of the weights (position_ids stay I64)
  std::uint64_t seed = 1;
  bool ema = false;              // single file: model_ema.* twins of every UNet tensor + decay/num_updates
  bool old_sd1_text = false;     // SD1 single file: cond_stage_model.transformer.* without text_model.
  bool full_size = false;        // real SD shapes (hundreds of MB to GB; write to disk)
  std::string variant;           // diffusers: "" or e.g. "fp16" (file names get .fp16.)
  int shards = 1;                // diffusers: > 1 writes a sharded UNet with an index
  bool proj_in = true;           // include proj_in weights (the SD1 conv vs SD2 linear clue)
  bool config_json = true;       // diffusers: write text_encoder*/config.json
  std::int64_t vocab = 49408;    // token embedding rows (tests of layouts may shrink it)
  std::string tokenizer_source;  // diffusers: copy vocab.json + merges.txt from this folder into
                                 // tokenizer/ (and tokenizer_2/); empty = no tokenizer folders
};

// Geometry used for a family (tiny unless full_size).
struct SynthGeometry {
  std::int64_t base_channels = 0;  // 32 tiny / 320 full
  std::int64_t te_width[2] = {0, 0};   // text encoder widths (second only for SDXL)
  std::int64_t te_layers[2] = {0, 0};
  std::int64_t vocab = 0;
  std::int64_t context_dim = 0;    // = te_width[0] (+ te_width[1] for SDXL)
  int text_encoders = 1;
};
SynthGeometry synth_geometry(const SynthOptions& options);

// The bytes of one synthetic safetensors file (SingleFile / UNetLDM / UNetDiffusers layouts).
std::string synth_safetensors(const SynthOptions& options);

// Writes the checkpoint to `path`: a file for file layouts, a folder for Diffusers (created; must
// not exist or be empty). Streams tensors, so full-size checkpoints do not need the RAM.
void write_synth_checkpoint(const std::string& path, const SynthOptions& options);

}  // namespace speed
