// Checkpoint detection: UNet spelling, K/V list, text encoders, family clues, EMA twins.
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <map>
#include <set>

#include "checkpoint_internal.h"
#include "checkpoint_layouts.h"
#include "speed/error.h"
#include "speed/log.h"

namespace speed {

using layouts::BlockNaming;

namespace detail {

void FamilyVote::restrict(std::set<Family> allowed, std::string why) {
  std::set<Family> next;
  for (Family f : candidates) {
    if (allowed.count(f)) next.insert(f);
  }
  clues.push_back(std::move(why));
  if (next.empty()) {
    fail_hint("the file may be a model family speed-erase does not support (SD 1.x, 2.x, XL)",
              "'{}' has inconsistent model clues: {}", path, fmt::join(clues, "; "));
  }
  candidates = std::move(next);
}

namespace {

std::string first_keys(const SafeTensors& st) {
  std::vector<std::string> names;
  for (const auto& t : st.tensors()) {
    if (names.size() == 5) break;
    names.push_back(t.name);
  }
  return fmt::format("{}", fmt::join(names, ", "));
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

std::size_t count_matches(const Checkpoint& ck, const std::vector<std::size_t>& files,
                          const layouts::UNetSpelling& sp) {
  std::size_t n = 0;
  for (std::size_t f : files) {
    for (const auto& t : ck.file(f).tensors()) {
      std::string_view name = t.name;
      if (!starts_with(name, sp.prefix)) continue;
      if (layouts::parse_kv_key(name.substr(std::strlen(sp.prefix)), sp.naming)) ++n;
    }
  }
  return n;
}

}  // namespace

void collect_unet(Checkpoint& ck, const std::vector<std::size_t>& files, FamilyVote& vote) {
  const layouts::UNetSpelling* best = nullptr;
  std::size_t best_n = 0;
  for (const auto& sp : layouts::kUNetSpellings) {
    std::size_t n = count_matches(ck, files, sp);
    if (n > best_n) {
      best = &sp;
      best_n = n;
    }
  }
  if (best == nullptr) {
    const SafeTensors& st = ck.file(files.front());
    bool lora = false;
    for (const auto& t : st.tensors()) lora = lora || t.name.find("lora_") != std::string::npos;
    fail_hint(lora ? "this looks like a LoRA file; pass the base model to --model"
                   : "speed-erase reads SD 1.x/2.x/XL single files, bare UNet files and diffusers folders",
              "no cross-attention K/V tensors found in '{}' ({} tensors; first keys: {})", st.path(),
              st.tensors().size(), first_keys(st));
  }
  ck.unet_prefix = best->prefix;
  ck.unet_naming = best->naming == BlockNaming::Ldm ? "ldm" : "diffusers";
  // K/V copies under another layout's names are not edited: a loader that reads those names
  // would get the concept back.
  for (const auto& sp : layouts::kUNetSpellings) {
    if (&sp == best) continue;
    if (const std::size_t n = count_matches(ck, files, sp); n > 0) {
      log().warn("'{}' also holds {} cross-attention K/V tensor(s) named for another UNet layout "
                 "({} names, prefix '{}'); only the {} named for '{}' ({} names) are edited, the "
                 "others are copied unchanged",
                 ck.path, n, sp.naming == BlockNaming::Ldm ? "LDM" : "diffusers", sp.prefix,
                 best_n, best->prefix, best->naming == BlockNaming::Ldm ? "LDM" : "diffusers");
    }
  }
  const std::size_t plen = std::strlen(best->prefix);

  struct Entry {
    layouts::KVKey key;
    KVLayer layer;
  };
  std::vector<Entry> entries;
  std::set<std::string> seen;
  bool proj_in_conv = false, proj_in_linear = false, label_emb = false;
  std::int64_t max_transformers = 0;
  for (std::size_t f : files) {
    const SafeTensors& st = ck.file(f);
    for (const auto& t : st.tensors()) {
      std::string_view name = t.name;
      if (!starts_with(name, best->prefix)) continue;
      std::string_view rest = name.substr(plen);
      if (rest == "label_emb.0.0.weight" || rest == "add_embedding.linear_1.weight") label_emb = true;
      if (rest.size() > 15 && rest.substr(rest.size() - 15) == ".proj_in.weight") {
        if (t.shape.size() == 4) proj_in_conv = true;
        if (t.shape.size() == 2) proj_in_linear = true;
      }
      bool unmapped = false;
      auto key = layouts::parse_kv_key(rest, best->naming, &unmapped);
      if (unmapped) {
        fail("'{}': cross-attention tensor '{}' sits where the SD UNet layout has no transformer",
             st.path(), t.name);
      }
      if (!key) continue;
      SPEED_CHECK(t.shape.size() == 2 && t.shape[0] > 0 && t.shape[1] > 0,
                  "'{}': tensor '{}' has shape {}, expected [out, in] with out, in >= 1", st.path(),
                  t.name, format_shape(t.shape));
      SPEED_CHECK(seen.insert(key->canonical).second, "'{}': tensor '{}' appears twice (as '{}')", st.path(),
                  key->canonical, t.name);
      KVLayer l;
      l.canonical = key->canonical;
      l.source = t.name;
      l.file = f;
      l.is_key = key->is_key;
      l.out = t.shape[0];
      l.in = t.shape[1];
      l.dtype = t.dtype;
      max_transformers = std::max<std::int64_t>(max_transformers, key->transformer + 1);
      entries.push_back({std::move(*key), std::move(l)});
    }
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    const auto& x = a.key;
    const auto& y = b.key;
    return std::tie(x.kind, x.block, x.attention, x.transformer, y.is_key) <
           std::tie(y.kind, y.block, y.attention, y.transformer, x.is_key);
  });

  // Pairs: every to_k has its to_v with the same shape; one context width everywhere.
  for (std::size_t i = 0; i < entries.size(); i += 2) {
    const auto& e = entries[i];
    std::string block = e.layer.canonical.substr(0, e.layer.canonical.size() - std::strlen("to_k.weight"));
    bool paired = e.key.is_key && i + 1 < entries.size() && !entries[i + 1].key.is_key &&
                  entries[i + 1].layer.canonical == block + "to_v.weight";
    if (!paired) {
      fail("'{}': cross-attention '{}' has {} but no {}", ck.file(e.layer.file).path(), block + "*",
           e.key.is_key ? "to_k" : "to_v", e.key.is_key ? "to_v" : "to_k");
    }
    const auto& v = entries[i + 1].layer;
    SPEED_CHECK(v.out == e.layer.out && v.in == e.layer.in, "tensor '{}' has shape [{}, {}], expected [{}, {}] (as '{}')",
                v.source, v.out, v.in, e.layer.out, e.layer.in, e.layer.source);
  }
  ck.context_dim = entries.front().layer.in;
  for (const auto& e : entries) {
    SPEED_CHECK(e.layer.in == ck.context_dim, "tensor '{}' has context width {}, expected {} (as '{}')",
                e.layer.source, e.layer.in, ck.context_dim, entries.front().layer.source);
  }
  ck.kv.clear();
  for (auto& e : entries) ck.kv.push_back(std::move(e.layer));

  // Structural family clues (reference/formats.md §2.1, §2.5).
  bool first_level = false, later_levels = false;
  for (const auto& e : entries) {
    // The highest-resolution level is down_blocks.0 / up_blocks.3 in the 4-level SD 1.x/2.x UNet.
    if ((e.key.kind == 0 && e.key.block == 0) || (e.key.kind == 1 && e.key.block == 3)) {
      first_level = true;
    } else {
      later_levels = true;
    }
  }
  if (label_emb) vote.restrict({Family::SDXL}, "UNet has label_emb / add_embedding (SDXL)");
  if (max_transformers > 1) {
    vote.restrict({Family::SDXL}, fmt::format("UNet blocks hold up to {} transformer blocks (SDXL)", max_transformers));
  }
  if (first_level) {
    vote.restrict({Family::SD1, Family::SD2}, "cross-attention in the first UNet level (SD 1.x/2.x)");
  } else if (later_levels) {
    vote.restrict({Family::SDXL}, "no cross-attention in the first UNet level (SDXL)");
  }
  if (proj_in_conv) vote.restrict({Family::SD1}, "proj_in is a 1x1 conv (SD 1.x)");
  if (proj_in_linear) vote.restrict({Family::SD2, Family::SDXL}, "proj_in is linear (SD 2.x/XL)");
}

void collect_ema(Checkpoint& ck) {
  std::set<std::size_t> files;
  for (const auto& l : ck.kv) files.insert(l.file);
  ck.ema_tensors = 0;
  for (std::size_t f : files) {
    for (const auto& t : ck.file(f).tensors()) ck.ema_tensors += starts_with(t.name, "model_ema.") ? 1 : 0;
  }
  if (ck.unet_prefix != "model.diffusion_model.") return;
  for (auto& l : ck.kv) {
    std::string twin = ema_twin_name(l.source);
    const TensorInfo* t = ck.file(l.file).find(twin);
    if (t == nullptr) continue;
    const std::vector<std::int64_t> want{l.out, l.in};
    SPEED_CHECK(t->dtype == l.dtype && t->shape == want,
                "EMA twin '{}' is {} {}, expected {} [{}, {}] as '{}'", twin, dtype_name(t->dtype),
                format_shape(t->shape), dtype_name(l.dtype), l.out, l.in, l.source);
    l.ema_twin = twin;
    ck.has_ema = true;
  }
}

}  // namespace detail

namespace {

void decide_family(Checkpoint& ck, detail::FamilyVote& vote) {
  if (vote.candidates.size() > 1) {
    // Last resort: the real models' context widths (tiny test files never get here by design).
    for (const auto& row : layouts::kFamilies) {
      if (row.context_dim == ck.context_dim && vote.candidates.count(row.family)) {
        vote.restrict({row.family}, fmt::format("context width {} ({})", ck.context_dim, family_name(row.family)));
        break;
      }
    }
  }
  if (vote.candidates.size() != 1) {
    std::vector<std::string> names;
    for (Family f : vote.candidates) names.push_back(family_name(f));
    fail_hint("give the text encoder alongside the UNet (a full single file or a diffusers folder)",
              "cannot tell the model family of '{}': could be {} (clues: {}; context width {})", ck.path,
              fmt::join(names, " or "), vote.clues.empty() ? std::string("none") : fmt::format("{}", fmt::join(vote.clues, "; ")),
              ck.context_dim);
  }
  ck.family = *vote.candidates.begin();
}

}  // namespace

namespace detail {

void finish(Checkpoint& ck, std::vector<FoundEncoder>& encoders, FamilyVote& vote) {
  for (const auto& e : encoders) {
    if (e.family) {
      vote.restrict({*e.family}, fmt::format("text encoder '{}' ({})", e.info.prefix, e.what));
    }
    if (e.config_family.size()) vote.restrict(e.config_family, e.config_clue);
  }
  decide_family(ck, vote);
  const auto& row = layouts::family_row(ck.family);
  std::sort(encoders.begin(), encoders.end(), [](const auto& a, const auto& b) { return a.slot < b.slot; });
  if (!encoders.empty()) {
    SPEED_CHECK(static_cast<int>(encoders.size()) == row.text_encoders,
                "'{}' is {} by its UNet but has {} text encoder(s), expected {}", ck.path, family_name(ck.family),
                encoders.size(), row.text_encoders);
    std::int64_t width = 0;
    for (std::size_t i = 0; i < encoders.size(); ++i) {
      auto& te = encoders[i];
      SPEED_CHECK(te.slot == static_cast<int>(i), "'{}': text encoder {} is missing", ck.path, i);
      const auto& fr = row.text[i];
      if (!te.activation_from_config) te.info.activation = fr.activation;
      te.info.pad_id = fr.pad_id;
      te.info.final_layer_norm = fr.final_layer_norm;
      int skip = fr.skip_last;
      // SD 2.x: the diffusers encoder (HF names) and files converted back from it keep 23 of the
      // 24 resblocks, so they are already cut at the penultimate layer.
      if (ck.family == Family::SD2 && (te.info.naming == TextNaming::HF || te.info.layers == 23)) skip = 0;
      te.info.output_layer = skip == 0 ? -1 : static_cast<int>(te.info.layers) - skip;
      SPEED_CHECK(te.info.output_layer != 0, "text encoder '{}' has {} layer(s), too few for {}", te.info.prefix,
                  te.info.layers, family_name(ck.family));
      width += te.info.width;
    }
    SPEED_CHECK(width == ck.context_dim,
                "'{}': text encoder width {} does not match the UNet context width {}", ck.path, width,
                ck.context_dim);
  }
  ck.text_encoders.clear();
  for (auto& te : encoders) ck.text_encoders.push_back(te.info);
  ck.detection = vote.clues;
  log().debug("'{}': {} {} ({})", ck.path, family_name(ck.family), layout_name(ck.layout),
              fmt::join(vote.clues, "; "));
}

}  // namespace detail

}  // namespace speed
