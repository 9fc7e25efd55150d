// Internal: detection pieces shared by the single-file and diffusers-folder openers.
#pragma once

#include <set>
#include <string>
#include <vector>

#include "speed/checkpoint.h"

namespace speed::detail {

// Family candidates narrowed by clues; an empty intersection is an "inconsistent" error.
struct FamilyVote {
  std::string path;
  std::set<Family> candidates{Family::SD1, Family::SD2, Family::SDXL};
  std::vector<std::string> clues;
  void restrict(std::set<Family> allowed, std::string why);
};

struct FoundEncoder {
  TextEncoderInfo info;
  int slot = 0;
  std::optional<Family> family;  // implied by the single-file spelling
  std::string what;
  bool activation_from_config = false;
  std::set<Family> config_family;  // implied by config.json (hidden_act), if any
  std::string config_clue;
};

// Fills kv, context_dim, unet_prefix/naming from the UNet tensors in `files`; adds UNet clues.
void collect_unet(Checkpoint& ck, const std::vector<std::size_t>& files, FamilyVote& vote);
// Fills ema_twin / has_ema / ema_tensors (single files with the model.diffusion_model. prefix).
void collect_ema(Checkpoint& ck);
// Reads an encoder's geometry from its tensors (heads = width / 64 until a config says otherwise).
TextEncoderInfo read_text_encoder(const SafeTensors& st, std::size_t file, const std::string& prefix,
                                  TextNaming naming);
// Decides the family, applies the per-family text-encoder facts, checks widths.
void finish(Checkpoint& ck, std::vector<FoundEncoder>& encoders, FamilyVote& vote);

}  // namespace speed::detail
