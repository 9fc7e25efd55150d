// Layout detection on the golden fixtures and on synthetic checkpoints of every layout; the
// LDM <-> diffusers naming rule; the errors for unknown and inconsistent files.
#include <cstdlib>
#include <set>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "speed/checkpoint.h"
#include "speed/error.h"
#include "speed/synth.h"

using namespace speed;
using Catch::Matchers::Contains;

namespace {

const std::string kGolden = std::string(SPEED_SHARED_DIR) + "/golden/";

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/speed-ck-XXXXXX";
    REQUIRE(::mkdtemp(t) != nullptr);
    path = t;
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

Checkpoint detect_memory(const SynthOptions& o, const std::string& label = "synth.safetensors") {
  auto st = std::make_shared<const SafeTensors>(SafeTensors::from_memory(synth_safetensors(o), label));
  return detect_checkpoint(st, label);
}

// A file from names and shapes only (zero data), for crafted detection cases.
Checkpoint detect_names(const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& list) {
  std::vector<TensorData> ts;
  std::uint64_t total = 0;
  for (const auto& [n, s] : list) {
    std::uint64_t b = 4;
    for (auto d : s) b *= static_cast<std::uint64_t>(d);
    ts.push_back({n, Dtype::F32, s, nullptr, static_cast<std::size_t>(b)});
    total += b;
  }
  std::string h = make_header(ts, {});
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
  bytes += h + std::string(total, '\0');
  auto st = std::make_shared<const SafeTensors>(SafeTensors::from_memory(bytes, "crafted.safetensors"));
  return detect_checkpoint(st, "crafted.safetensors");
}

std::vector<std::string> canonical(const Checkpoint& ck) {
  std::vector<std::string> out;
  for (const auto& l : ck.kv) out.push_back(l.canonical);
  return out;
}

// The SD 1.x/2.x reference order (SPEC §1.3): down_blocks, up_blocks, mid_block; k before v.
std::vector<std::string> sd1_order() {
  std::vector<std::string> blocks;
  for (int b = 0; b < 3; ++b)
    for (int a = 0; a < 2; ++a) blocks.push_back(fmt::format("down_blocks.{}.attentions.{}", b, a));
  for (int b = 1; b < 4; ++b)
    for (int a = 0; a < 3; ++a) blocks.push_back(fmt::format("up_blocks.{}.attentions.{}", b, a));
  blocks.push_back("mid_block.attentions.0");
  std::vector<std::string> out;
  for (const auto& b : blocks) {
    out.push_back(b + ".transformer_blocks.0.attn2.to_k.weight");
    out.push_back(b + ".transformer_blocks.0.attn2.to_v.weight");
  }
  return out;
}

}  // namespace

TEST_CASE("checkpoint: LDM <-> diffusers block names", "[unit]") {
  const std::pair<const char*, const char*> rows[] = {
      {"input_blocks.1.1", "down_blocks.0.attentions.0"},  {"input_blocks.2.1", "down_blocks.0.attentions.1"},
      {"input_blocks.4.1", "down_blocks.1.attentions.0"},  {"input_blocks.5.1", "down_blocks.1.attentions.1"},
      {"input_blocks.7.1", "down_blocks.2.attentions.0"},  {"input_blocks.8.1", "down_blocks.2.attentions.1"},
      {"middle_block.1", "mid_block.attentions.0"},        {"output_blocks.0.1", "up_blocks.0.attentions.0"},
      {"output_blocks.2.1", "up_blocks.0.attentions.2"},   {"output_blocks.3.1", "up_blocks.1.attentions.0"},
      {"output_blocks.9.1", "up_blocks.3.attentions.0"},   {"output_blocks.10.1", "up_blocks.3.attentions.1"},
      {"output_blocks.11.1", "up_blocks.3.attentions.2"},
  };
  for (const auto& [ldm, dif] : rows) {
    CAPTURE(ldm, dif);
    CHECK(ldm_to_diffusers_block(ldm) == std::optional<std::string>(dif));
    CHECK(diffusers_to_ldm_block(dif) == std::optional<std::string>(ldm));
  }
  for (const char* bad : {"input_blocks.3.1", "input_blocks.0.1", "input_blocks.01.1", "input_blocks.1.0", "middle_block.0",
                          "input_blocks.-1.1", "input_blocks.1", "output_blocks.x.1", "input_blocks.99999999999.1"}) {
    CAPTURE(bad);
    CHECK_FALSE(ldm_to_diffusers_block(bad).has_value());
  }
  for (const char* bad : {"down_blocks.0.attentions.2", "mid_block.attentions.1", "up_blocks.0.attentions.3", "down_blocks.0"}) {
    CAPTURE(bad);
    CHECK_FALSE(diffusers_to_ldm_block(bad).has_value());
  }
  CHECK(ema_twin_name("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") ==
        "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight");
}

TEST_CASE("checkpoint: golden single file (SD1, tiny widths)", "[unit][golden]") {
  auto ck = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  CHECK(ck.family == Family::SD1);
  CHECK(ck.layout == Layout::SingleFile);
  CHECK(ck.unet_naming == "ldm");
  CHECK(ck.unet_prefix == "model.diffusion_model.");
  CHECK(ck.context_dim == 128);
  REQUIRE(ck.kv.size() == 32);
  CHECK(ck.kv_layers() == 16);
  CHECK(canonical(ck) == sd1_order());
  CHECK(ck.kv[0].source == "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight");
  CHECK(ck.kv[0].is_key);
  CHECK_FALSE(ck.kv[1].is_key);
  // Numeric, not lexicographic: output_blocks.9 < 10 < 11 (up_blocks.3.attentions.0/1/2).
  CHECK(ck.kv[24].source == "model.diffusion_model.output_blocks.9.1.transformer_blocks.0.attn2.to_k.weight");
  CHECK(ck.kv[26].source == "model.diffusion_model.output_blocks.10.1.transformer_blocks.0.attn2.to_k.weight");
  CHECK(ck.kv[30].source == "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight");
  const std::int64_t outs[16] = {32, 32, 64, 64, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32, 128};
  for (std::size_t i = 0; i < 32; ++i) {
    CAPTURE(ck.kv[i].canonical);
    CHECK(ck.kv[i].out == outs[i / 2]);
    CHECK(ck.kv[i].in == 128);
    CHECK(ck.kv[i].dtype == Dtype::F32);
    CHECK(ck.kv[i].file == 0);
  }
  std::set<std::string> twins;
  for (const auto& l : ck.kv) {
    if (l.ema_twin) twins.insert(*l.ema_twin);
  }
  CHECK(twins == std::set<std::string>{"model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight",
                                       "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_vweight",
                                       "model_ema.diffusion_modelmiddle_block1transformer_blocks0attn2to_vweight"});
  CHECK(ck.has_ema);
  CHECK(ck.ema_tensors == 5);
  REQUIRE(ck.text_encoders.size() == 1);
  const auto& te = ck.text_encoders[0];
  CHECK(te.prefix == "cond_stage_model.transformer.text_model.");
  CHECK(te.naming == TextNaming::HF);
  CHECK(te.vocab == 49408);
  CHECK(te.positions == 77);
  CHECK(te.width == 128);
  CHECK(te.layers == 2);
  CHECK(te.heads == 2);
  CHECK(te.mlp == 512);
  CHECK(te.activation == Activation::QuickGELU);
  CHECK(te.pad_id == 49407);
  CHECK(te.output_layer == -1);
  CHECK(te.final_layer_norm);
  CHECK_FALSE(te.has_projection);
  CHECK_FALSE(ck.tokenizer_dir.has_value());

  auto j = describe_checkpoint(ck);
  CHECK(j["family"] == "sd1");
  CHECK(j["layout"] == "single-file");
  CHECK(j["unet"]["kv_layers"] == 16);
  CHECK(j["ema"]["kv_twins"] == 3);
  CHECK(j["dtypes"]["F16"] == 1);
  CHECK(j["dtypes"]["F32"] == 258);
  CHECK(j["files"][0]["metadata_keys"][0] == "format");
  CHECK(j["kv"][0]["shape"] == nlohmann::ordered_json::array({32, 128}));
  CHECK(j.begin().key() == "path");  // stable, insertion-ordered keys
  const std::string text = describe_checkpoint_text(ck);
  CHECK_THAT(text, Contains("family:       sd1"));
  CHECK_THAT(text, Contains("K/V layers:   16 (32 tensors)"));
}

TEST_CASE("checkpoint: golden diffusers folder has the same 32 canonical names", "[unit][golden]") {
  auto single = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  auto ck = open_checkpoint(kGolden + "fixture_tiny_diffusers");
  CHECK(ck.family == Family::SD1);
  CHECK(ck.layout == Layout::Diffusers);
  CHECK(ck.unet_naming == "diffusers");
  CHECK(canonical(ck) == canonical(single));
  for (std::size_t i = 0; i < ck.kv.size(); ++i) {
    CHECK(ck.kv[i].source == ck.kv[i].canonical);
    CHECK(ck.kv[i].out == single.kv[i].out);
    CHECK(ck.files[ck.kv[i].file].role == "unet");
  }
  CHECK_FALSE(ck.has_ema);
  REQUIRE(ck.text_encoders.size() == 1);
  const auto& te = ck.text_encoders[0];
  CHECK(te.prefix == "text_model.");
  CHECK(ck.files[te.file].role == "text_encoder");
  CHECK(te.heads == 2);
  CHECK(te.width == 128);
  CHECK(te.activation == Activation::QuickGELU);
  CHECK(te.config_path.has_value());
  REQUIRE(ck.tokenizer_dir.has_value());
  CHECK(*ck.tokenizer_dir == kGolden + "fixture_tiny_diffusers/tokenizer");
  CHECK(te.tokenizer_dir == ck.tokenizer_dir);
}

TEST_CASE("checkpoint: synthetic single files and bare UNets of every family", "[unit]") {
  struct Want {
    Family family;
    std::size_t kv;
    std::int64_t ctx;
  };
  for (const Want w : {Want{Family::SD1, 32, 64}, Want{Family::SD2, 32, 64}, Want{Family::SDXL, 140, 128}}) {
    SynthOptions o;
    o.family = w.family;
    o.vocab = 512;
    o.ema = true;
    o.dtype = w.family == Family::SDXL ? Dtype::F16 : Dtype::F32;
    CAPTURE(family_name(w.family));
    auto ck = detect_memory(o);
    CHECK(ck.family == w.family);
    CHECK(ck.layout == Layout::SingleFile);
    CHECK(ck.kv.size() == w.kv);
    CHECK(ck.context_dim == w.ctx);
    CHECK(ck.kv.front().dtype == o.dtype);
    bool all_twins = true;
    for (const auto& l : ck.kv) all_twins = all_twins && l.ema_twin.has_value();
    CHECK(all_twins);
    for (const auto& l : ck.kv) {
      // The source block maps back to the canonical one.
      const std::string rest = l.source.substr(std::string("model.diffusion_model.").size());
      const std::string block = rest.substr(0, rest.find(".transformer_blocks."));
      REQUIRE(ldm_to_diffusers_block(block).has_value());
      CHECK(l.canonical.rfind(*ldm_to_diffusers_block(block), 0) == 0);
    }
    const auto names = canonical(ck);
    for (SynthLayout layout : {SynthLayout::UNetLDM, SynthLayout::UNetDiffusers}) {
      SynthOptions u = o;
      u.layout = layout;
      auto uk = detect_memory(u);
      CHECK(uk.family == w.family);
      CHECK(uk.layout == Layout::UNetOnly);
      CHECK(uk.unet_naming == (layout == SynthLayout::UNetLDM ? "ldm" : "diffusers"));
      CHECK(uk.unet_prefix.empty());
      CHECK(uk.text_encoders.empty());
      CHECK(canonical(uk) == names);
    }
    if (w.family == Family::SD1) {
      CHECK(names == sd1_order());
      const auto& te = ck.text_encoders.at(0);
      CHECK(te.prefix == "cond_stage_model.transformer.text_model.");
      CHECK(te.activation == Activation::QuickGELU);
      CHECK(te.heads == 1);
    } else if (w.family == Family::SD2) {
      const auto& te = ck.text_encoders.at(0);
      CHECK(te.prefix == "cond_stage_model.model.");
      CHECK(te.naming == TextNaming::OpenCLIP);
      CHECK(te.activation == Activation::GELU);
      CHECK(te.pad_id == 0);
      CHECK(te.layers == 3);
      CHECK(te.output_layer == 2);  // penultimate
      CHECK(te.final_layer_norm);
      CHECK(te.has_projection);
    } else {
      REQUIRE(ck.text_encoders.size() == 2);
      CHECK(ck.text_encoders[0].prefix == "conditioner.embedders.0.transformer.text_model.");
      CHECK(ck.text_encoders[0].activation == Activation::QuickGELU);
      CHECK(ck.text_encoders[0].pad_id == 49407);
      CHECK(ck.text_encoders[0].output_layer == 1);
      CHECK_FALSE(ck.text_encoders[0].final_layer_norm);
      CHECK(ck.text_encoders[1].prefix == "conditioner.embedders.1.model.");
      CHECK(ck.text_encoders[1].activation == Activation::GELU);
      CHECK(ck.text_encoders[1].pad_id == 0);
      CHECK(ck.text_encoders[1].output_layer == 2);
      CHECK_FALSE(ck.text_encoders[1].final_layer_norm);
      // 70 layers; transformer_blocks in numeric order inside each attention.
      CHECK(ck.kv_layers() == 70);
      CHECK(ck.kv[0].canonical == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight");
      CHECK(ck.kv[8].canonical == "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight");
      CHECK(ck.kv[8 + 18].canonical == "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k.weight");
      CHECK(ck.kv[8 + 20].canonical == "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight");
      CHECK(ck.kv[48].canonical == "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight");
      CHECK(ck.kv[120].canonical == "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight");
      CHECK(ck.kv[139].canonical == "mid_block.attentions.0.transformer_blocks.9.attn2.to_v.weight");
    }
  }
  SynthOptions old;
  old.old_sd1_text = true;
  old.vocab = 512;
  auto ok = detect_memory(old);
  CHECK(ok.family == Family::SD1);
  CHECK(ok.text_encoders.at(0).prefix == "cond_stage_model.transformer.");
}

TEST_CASE("checkpoint: synthetic diffusers folders (variant, shards, SDXL)", "[unit]") {
  TempDir dir;
  struct Case {
    Family family;
    std::string variant;
    int shards;
    Dtype dtype;
  };
  for (const Case& c : {Case{Family::SD1, "", 1, Dtype::F32}, Case{Family::SD1, "fp16", 1, Dtype::F16},
                       Case{Family::SD2, "", 3, Dtype::F32}, Case{Family::SDXL, "fp16", 2, Dtype::F16}}) {
    SynthOptions o;
    o.family = c.family;
    o.layout = SynthLayout::Diffusers;
    o.variant = c.variant;
    o.shards = c.shards;
    o.dtype = c.dtype;
    o.vocab = 512;
    o.tokenizer_source = kGolden + "fixture_tiny_diffusers/tokenizer";
    const std::string path = fmt::format("{}/{}-{}-{}", dir.path, family_name(c.family), c.variant, c.shards);
    CAPTURE(path);
    write_synth_checkpoint(path, o);
    auto ck = open_checkpoint(path);
    SynthOptions single = o;
    single.layout = SynthLayout::SingleFile;
    auto ref = detect_memory(single);
    CHECK(ck.family == c.family);
    CHECK(ck.layout == Layout::Diffusers);
    CHECK(ck.variant == c.variant);
    CHECK(ck.unet_index.has_value() == (c.shards > 1));
    CHECK(canonical(ck) == canonical(ref));
    CHECK(ck.kv.front().dtype == c.dtype);
    std::set<std::size_t> unet_files;
    for (const auto& l : ck.kv) unet_files.insert(l.file);
    CHECK(unet_files.size() == static_cast<std::size_t>(c.shards));
    REQUIRE(ck.text_encoders.size() == ref.text_encoders.size());
    CHECK(ck.tokenizer_dir == std::optional<std::string>(path + "/tokenizer"));
    if (c.family == Family::SD2) {
      CHECK(ck.text_encoders[0].layers == 2);  // diffusers keeps all but the last OpenCLIP layer
      CHECK(ck.text_encoders[0].output_layer == -1);
      CHECK(ck.text_encoders[0].activation == Activation::GELU);
      CHECK(ck.text_encoders[0].pad_id == 0);
    }
    if (c.family == Family::SDXL) {
      CHECK(ck.files[ck.text_encoders[1].file].role == "text_encoder_2");
      CHECK(ck.text_encoders[1].has_projection);
      CHECK(ck.text_encoders[1].tokenizer_dir == std::optional<std::string>(path + "/tokenizer_2"));
      CHECK(ck.text_encoders[1].activation == Activation::GELU);
      CHECK(ck.text_encoders[1].output_layer == 2);
    }
  }
}

TEST_CASE("checkpoint: same seed, same bytes; different seed, different bytes", "[unit]") {
  SynthOptions o;
  o.vocab = 256;
  o.layout = SynthLayout::UNetDiffusers;
  CHECK(synth_safetensors(o) == synth_safetensors(o));
  SynthOptions p = o;
  p.seed = 2;
  CHECK(synth_safetensors(o) != synth_safetensors(p));
}

TEST_CASE("checkpoint: unknown and inconsistent files", "[unit]") {
  const std::vector<std::int64_t> kv{32, 64};
  auto sd_blocks = [&](const std::string& prefix) {
    std::vector<std::pair<std::string, std::vector<std::int64_t>>> l;
    for (const char* b : {"input_blocks.1.1", "output_blocks.11.1"}) {
      l.push_back({prefix + b + ".transformer_blocks.0.attn2.to_k.weight", kv});
      l.push_back({prefix + b + ".transformer_blocks.0.attn2.to_v.weight", kv});
    }
    return l;
  };
  REQUIRE_THROWS_WITH(detect_names({{"first_stage_model.a", {2}}, {"b", {3}}}),
                      Contains("no cross-attention K/V tensors found in 'crafted.safetensors' (2 tensors; first keys: "
                               "first_stage_model.a, b)"));
  REQUIRE_THROWS_WITH(detect_names({{"lora_unet_down_blocks_0_attentions_0.lora_up.weight", {4, 2}}}),
                      Contains("no cross-attention K/V tensors"));
  {
    auto l = sd_blocks("model.diffusion_model.");
    l.pop_back();
    REQUIRE_THROWS_WITH(detect_names(l), Contains("cross-attention 'up_blocks.3.attentions.2.transformer_blocks.0.attn2.*' "
                                                  "has to_k but no to_v"));
  }
  // The text-encoder tensors of a synthetic SD1 file (width 64), to pair with crafted UNets.
  SynthOptions sd1;
  sd1.vocab = 64;
  auto sd1_st = SafeTensors::from_memory(synth_safetensors(sd1), "sd1.safetensors");
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> text;
  for (const auto& t : sd1_st.tensors()) {
    if (t.name.rfind("cond_stage_model.", 0) == 0) text.push_back({t.name, t.shape});
  }
  {
    auto l = sd_blocks("model.diffusion_model.");
    l.push_back({"model.diffusion_model.input_blocks.1.1.proj_in.weight", {32, 32}});
    l.insert(l.end(), text.begin(), text.end());
    REQUIRE_THROWS_WITH(detect_names(l), Contains("inconsistent model clues") && Contains("proj_in is linear") &&
                                             Contains("CLIP-L (ldm)"));
  }
  {
    std::vector<std::pair<std::string, std::vector<std::int64_t>>> l;
    for (const char* b : {"input_blocks.1.1", "output_blocks.11.1"}) {
      for (const char* kvn : {"to_k", "to_v"}) {
        l.push_back({fmt::format("model.diffusion_model.{}.transformer_blocks.0.attn2.{}.weight", b, kvn), {32, 96}});
      }
    }
    l.insert(l.end(), text.begin(), text.end());
    REQUIRE_THROWS_WITH(detect_names(l), Contains("text encoder width 64 does not match the UNet context width 96"));
  }
  {
    auto l = sd_blocks("");
    REQUIRE_THROWS_WITH(detect_names(l), Contains("cannot tell the model family of 'crafted.safetensors': could be sd1 or sd2"));
    l.push_back({"input_blocks.1.1.proj_in.weight", {32, 32, 1, 1}});
    CHECK(detect_names(l).family == Family::SD1);
    CHECK(detect_names(l).layout == Layout::UNetOnly);
  }
  {
    auto l = sd_blocks("model.diffusion_model.");
    l[1].second = {32, 48};
    REQUIRE_THROWS_WITH(detect_names(l), Contains("has shape [32, 48], expected [32, 64]"));
  }
  {
    auto l = sd_blocks("model.diffusion_model.");
    l.push_back({"model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", kv});
    REQUIRE_THROWS_WITH(detect_names(l), Contains("sits where the SD UNet layout has no transformer"));
  }
  TempDir dir;
  REQUIRE_THROWS_WITH(open_checkpoint(dir.path), Contains("is a folder without a unet/ subfolder"));
  REQUIRE_THROWS_WITH(open_checkpoint(dir.path + "/none.safetensors"), Contains("cannot open"));
}
