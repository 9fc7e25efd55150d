// Tests of the export module: full (single file, diffusers folder), edited, pt, lora.
#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "speed/checkpoint.h"
#include "speed/error.h"
#include "speed/export.h"
#include "speed/safetensors.h"
#include "speed/synth.h"
#include "speed/tensor.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace speed;

namespace {

using test::slurp;
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("speed-export") {}
};

const fs::path kGolden = fs::path(SPEED_SHARED_DIR) / "golden";



// Read-only golden files: copy (and make writable) before use.
fs::path copy_fixture(const fs::path& from, const fs::path& dir) {
  fs::path to = dir / from.filename();
  fs::copy(from, to, fs::copy_options::recursive);
  if (fs::is_directory(to)) {
    for (auto& e : fs::recursive_directory_iterator(to)) {
      fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
    }
  }
  fs::permissions(to, fs::perms::owner_write, fs::perm_options::add);
  return to;
}

at::Tensor stored_f64(const Checkpoint& ckpt, const KVLayer& l) {
  return load_tensor(ckpt.files[l.file].st, ckpt.file(l.file).at(l.source), at::kDouble).clone();
}

// W' = W + a rank-2 ΔW for every K/V layer (deterministic).
EditedWeights rank2_edits(const Checkpoint& ckpt) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  EditedWeights out;
  for (const auto& l : ckpt.kv) {
    at::Tensor a = at::randn({l.out, 2}, gen, at::kDouble);
    at::Tensor b = at::randn({2, l.in}, gen, at::kDouble);
    out[l.canonical] = stored_f64(ckpt, l) + 0.05 * at::matmul(a, b);
  }
  return out;
}

bool same_bytes(const SafeTensors& a, const TensorInfo& ta, const SafeTensors& b,
                const TensorInfo& tb) {
  return ta.dtype == tb.dtype && ta.shape == tb.shape && ta.nbytes() == tb.nbytes() &&
         std::memcmp(a.data(ta), b.data(tb), ta.nbytes()) == 0;
}

std::string meta(const SafeTensors& st, const std::string& key) {
  const std::string* v = st.metadata_value(key);
  return v ? *v : std::string("<absent>");
}

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

}  // namespace

TEST_CASE("export: names, formats, LoRA factors, dtype casts", "[unit]") {
  CHECK(parse_format("lora") == OutputFormat::Lora);
  CHECK_THROWS_WITH(parse_format("ckpt"), Catch::Contains("unknown output format 'ckpt'"));
  CHECK(lora_module_name(Family::SD1, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight") ==
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k");
  CHECK(lora_module_name(Family::SDXL, "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v.weight") ==
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v");
  CHECK(lora_module_name(Family::SDXL, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight") ==
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k");
  CHECK(is_stale_hash_key("sshs_model_hash"));
  CHECK(is_stale_hash_key("modelspec.hash_sha256"));
  CHECK_FALSE(is_stale_hash_key("modelspec.architecture"));

  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  at::Tensor d = at::matmul(at::randn({40, 3}, gen, at::kDouble), at::randn({3, 24}, gen, at::kDouble));
  LoraFactors f = lora_factors(d, 0.0, at::kDouble);
  CHECK(f.rank == 3);
  CHECK(f.up.sizes() == at::IntArrayRef({40, 3}));
  CHECK(f.down.sizes() == at::IntArrayRef({3, 24}));
  double err = max_abs(at::matmul(f.up, f.down) - d);
  INFO("max |up·down - ΔW| = " << err);
  CHECK(err < 1e-12);
  CHECK(lora_factors(at::zeros({8, 5}, at::kDouble), 0.0, at::kDouble).rank == 0);
  // A float32 W' carries ~1e-7 relative noise: the precision-aware threshold ignores it.
  at::Tensor noisy = d + 1e-9 * at::randn({40, 24}, gen, at::kDouble);
  CHECK(lora_factors(noisy, 0.0, at::kFloat).rank == 3);
  CHECK(lora_factors(noisy, 0.0, at::kDouble).rank > 3);

  // Round to nearest even: 1 + 2^-11 is halfway between 1 and the next half; it rounds to 1.
  at::Tensor x = at::tensor({1.0 + std::ldexp(1.0, -11), 1.0 + 3 * std::ldexp(1.0, -11)}, at::kDouble);
  at::Tensor h = to_stored_dtype(x, Dtype::F16).to(at::kDouble);
  CHECK(h[0].item<double>() == 1.0);
  CHECK(h[1].item<double>() == 1.0 + std::ldexp(1.0, -9));
  CHECK_THROWS_WITH(to_stored_dtype(x, Dtype::I64), Catch::Contains("cannot store an edited weight as I64"));
}

TEST_CASE("export: single-file outputs in every format", "[unit]") {
  TempDir tmp;
  fs::path model = copy_fixture(kGolden / "fixture_tiny_f32.safetensors", tmp.path);
  std::string before = slurp(model);
  Checkpoint ckpt = open_checkpoint(model.string());
  REQUIRE(ckpt.kv.size() == 32);
  EditedWeights edits = rank2_edits(ckpt);
  const std::string report = R"({"tool":"speed-erase","test":true})";
  std::set<std::string> changed;
  for (const auto& l : ckpt.kv) {
    changed.insert(l.source);
    if (l.ema_twin) changed.insert(*l.ema_twin);
  }
  REQUIRE(changed.size() == 35);  // 32 K/V + 3 EMA twins

  SECTION("default output path and pre-flight checks") {
    CHECK(default_output_path(ckpt, OutputFormat::Full) ==
          (tmp.path / "fixture_tiny_f32.speed-erase.safetensors").string());
    CHECK(default_output_path(ckpt, OutputFormat::Lora) ==
          (tmp.path / "fixture_tiny_f32.speed-erase.lora.safetensors").string());
    ExportOptions o;
    o.output = model.string();
    CHECK_THROWS_WITH(prepare_output(ckpt, o), Catch::Contains("is the input model"));
    o.output = (tmp.path / "missing" / "x.safetensors").string();
    CHECK_THROWS_WITH(prepare_output(ckpt, o), Catch::Contains("does not exist"));
    o.output = (tmp.path / "exists.safetensors").string();
    std::ofstream(o.output) << "x";
    CHECK_THROWS_WITH(prepare_output(ckpt, o), Catch::Contains("already exists"));
    o.force = true;
    CHECK(prepare_output(ckpt, o) == o.output);
  }

  SECTION("full: only K/V and EMA twins change; metadata carries the report") {
    ExportOptions o;
    o.report_json = report;
    ExportResult r = export_edit(ckpt, edits, o);
    CHECK(r.path == default_output_path(ckpt, OutputFormat::Full));
    CHECK(r.ema_edited == 3);
    SafeTensors in = SafeTensors::open(model.string());
    SafeTensors out = SafeTensors::open(r.path);
    CHECK(std::string_view(out.header_json()).substr(0, 2) == "{\"");
    CHECK(out.header_size() % 8 == 0);
    REQUIRE(out.tensors().size() == in.tensors().size());
    int identical = 0;
    for (std::size_t i = 0; i < in.tensors().size(); ++i) {
      const TensorInfo& ti = in.tensors()[i];
      const TensorInfo& to = out.tensors()[i];
      REQUIRE(ti.name == to.name);  // same order
      if (changed.count(ti.name)) {
        CHECK_FALSE(same_bytes(in, ti, out, to));
      } else {
        INFO("tensor " << ti.name);
        CHECK(same_bytes(in, ti, out, to));
        ++identical;
      }
    }
    CHECK(identical == static_cast<int>(in.tensors().size()) - 35);
    for (const auto& l : ckpt.kv) {
      at::Tensor want = to_stored_dtype(edits.at(l.canonical), l.dtype);
      at::Tensor got = load_tensor(std::make_shared<SafeTensors>(SafeTensors::open(r.path)),
                                   out.at(l.source), at::kFloat);
      CHECK(at::equal(got, want));
      if (l.ema_twin) CHECK(at::equal(load_tensor(std::make_shared<SafeTensors>(SafeTensors::open(r.path)),
                                                  out.at(*l.ema_twin), at::kFloat), want));
    }
    CHECK(meta(out, kReportMetadataKey) == report);
    CHECK(meta(out, "format") == "pt");
    CHECK(meta(out, "modelspec.architecture") == meta(in, "modelspec.architecture"));
    CHECK(slurp(model) == before);  // the input is untouched
    // No temp files left beside the output.
    for (auto& e : fs::directory_iterator(tmp.path)) CHECK(e.path().filename().string()[0] != '.');
  }

  SECTION("full --drop-ema drops every model_ema.* tensor; stale hashes are removed") {
    // Give the input stale kohya/modelspec hashes first.
    fs::path hashed = tmp.path / "hashed.safetensors";
    RewriteOptions ro;
    ro.set_metadata = {{"sshs_model_hash", "abc"}, {"modelspec.hash_sha256", "0xdef"}};
    rewrite_safetensors(SafeTensors::open(model.string()), hashed.string(), ro);
    Checkpoint hc = open_checkpoint(hashed.string());
    ExportOptions o;
    o.drop_ema = true;
    o.output = (tmp.path / "pruned.safetensors").string();
    ExportResult r = export_edit(hc, edits, o);
    CHECK(r.ema_dropped == 5);  // 3 twins + decay + num_updates
    SafeTensors out = SafeTensors::open(r.path);
    for (const auto& t : out.tensors()) CHECK(t.name.rfind("model_ema.", 0) != 0);
    CHECK(meta(out, "sshs_model_hash") == "<absent>");
    CHECK(meta(out, "modelspec.hash_sha256") == "<absent>");
    CHECK(meta(out, "modelspec.title") == meta(SafeTensors::open(model.string()), "modelspec.title"));
  }

  SECTION("edited and pt: the edited tensors under diffusers names") {
    ExportOptions o;
    o.report_json = report;
    o.format = OutputFormat::Edited;
    ExportResult r = export_edit(ckpt, edits, o);
    auto out = std::make_shared<SafeTensors>(SafeTensors::open(r.path));
    REQUIRE(out->tensors().size() == 32);
    CHECK(meta(*out, kReportMetadataKey) == report);
    for (const auto& l : ckpt.kv) {
      const TensorInfo& t = out->at(l.canonical);
      CHECK(t.dtype == l.dtype);
      CHECK(at::equal(load_tensor(out, t, at::kFloat), to_stored_dtype(edits.at(l.canonical), l.dtype)));
    }

    o.format = OutputFormat::Pt;
    o.output = (tmp.path / "edit.pt").string();
    r = export_edit(ckpt, edits, o);
    CHECK(slurp(o.output + ".report.json") == report + "\n");
    std::string bytes = slurp(r.path);
    c10::IValue v = torch::jit::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
    REQUIRE(v.isGenericDict());
    auto dict = v.toGenericDict();
    CHECK(dict.size() == 32);
    for (const auto& l : ckpt.kv) {
      at::Tensor got = dict.at(l.canonical).toTensor();
      CHECK(at::equal(got, to_stored_dtype(edits.at(l.canonical), l.dtype)));
    }
    // Python's torch.load must read it (the reference's sampling scripts do).
    std::string py = "/usr/bin/python3 -c \"import torch; d = torch.load('" + r.path +
                     "'); assert len(d) == 32, len(d); "
                     "assert all(v.dtype == torch.float32 for v in d.values()); "
                     "print(sorted(d)[0], tuple(d[sorted(d)[0]].shape))\"";
    if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") == 0) {
      CHECK(std::system(py.c_str()) == 0);
    } else {
      WARN("/usr/bin/python3 has no torch: skipping the torch.load check of the .pt output");
    }
  }

  SECTION("lora: W + up·down reproduces W' within float32 rounding") {
    ExportOptions o;
    o.report_json = report;
    o.format = OutputFormat::Lora;
    ExportResult r = export_edit(ckpt, edits, o);
    auto out = std::make_shared<SafeTensors>(SafeTensors::open(r.path));
    CHECK(out->tensors().size() == 32 * 3);
    for (const auto& t : out->tensors()) CHECK(t.name.rfind("lora_unet_", 0) == 0);
    CHECK(meta(*out, "ss_network_module") == "networks.lora");
    CHECK(meta(*out, "ss_network_dim") == "2");
    CHECK(meta(*out, "ss_network_alpha") == "2");
    CHECK(meta(*out, "ss_base_model_version") == "sd_v1");
    CHECK(meta(*out, "modelspec.architecture") == "stable-diffusion-v1/lora");
    CHECK(meta(*out, "format") == "pt");
    CHECK(meta(*out, kReportMetadataKey) == report);
    REQUIRE(r.lora.size() == 32);
    double worst = 0;
    for (const auto& l : ckpt.kv) {
      std::string m = lora_module_name(Family::SD1, l.canonical);
      at::Tensor up = load_tensor(out, out->at(m + ".lora_up.weight"), at::kDouble);
      at::Tensor down = load_tensor(out, out->at(m + ".lora_down.weight"), at::kDouble);
      double alpha = load_tensor(out, out->at(m + ".alpha"), at::kDouble).item<double>();
      CHECK(up.size(1) == 2);
      CHECK(alpha == 2.0);
      at::Tensor w = stored_f64(ckpt, l);
      at::Tensor rebuilt = w + (alpha / up.size(1)) * at::matmul(up, down);
      at::Tensor want = edits.at(l.canonical);
      double rel = (rebuilt - want).norm().item<double>() / (want - w).norm().item<double>();
      worst = std::max(worst, rel);
    }
    INFO("worst ‖W + up·down − W'‖ / ‖ΔW‖ = " << worst);
    CHECK(worst < 1e-6);
  }

  SECTION("a failed export leaves no output") {
    EditedWeights bad = edits;
    bad.begin()->second = at::zeros({3, 3}, at::kDouble);
    ExportOptions o;
    o.output = (tmp.path / "bad.safetensors").string();
    CHECK_THROWS_WITH(export_edit(ckpt, bad, o), Catch::Contains("has shape [3, 3], expected"));
    CHECK_FALSE(fs::exists(o.output));
    EditedWeights unknown{{"down_blocks.9.attn2.to_k.weight", at::zeros({1, 1}, at::kDouble)}};
    CHECK_THROWS_WITH(export_edit(ckpt, unknown, o), Catch::Contains("is not a cross-attention K/V layer"));
    for (auto& e : fs::directory_iterator(tmp.path)) CHECK(e.path().filename().string()[0] != '.');
  }
}

TEST_CASE("export: diffusers folder -> folder with only the UNet file rewritten", "[unit]") {
  TempDir tmp;
  fs::path model = copy_fixture(kGolden / "fixture_tiny_diffusers", tmp.path);
  Checkpoint ckpt = open_checkpoint(model.string());
  REQUIRE(ckpt.layout == Layout::Diffusers);
  EditedWeights edits = rank2_edits(ckpt);
  ExportOptions o;
  o.report_json = R"({"x":1})";
  ExportResult r = export_edit(ckpt, edits, o);
  CHECK(r.path == (tmp.path / "fixture_tiny_diffusers.speed-erase").string());
  REQUIRE(r.written.size() == 1);
  CHECK(fs::path(r.written[0]) == fs::path(r.path) / "unet" / "diffusion_pytorch_model.safetensors");
  // Every other file is a byte-identical copy (not a link).
  int copies = 0;
  for (auto& e : fs::recursive_directory_iterator(model)) {
    if (!e.is_regular_file()) continue;
    fs::path rel = e.path().lexically_relative(model);
    fs::path o2 = fs::path(r.path) / rel;
    REQUIRE(fs::exists(o2));
    if (rel == fs::path("unet/diffusion_pytorch_model.safetensors")) continue;
    INFO("file " << rel);
    CHECK(slurp(e.path()) == slurp(o2));
    CHECK_FALSE(fs::equivalent(e.path(), o2));
    ++copies;
  }
  CHECK(copies == static_cast<int>(r.copied.size()));
  SafeTensors in = SafeTensors::open((model / "unet/diffusion_pytorch_model.safetensors").string());
  SafeTensors out = SafeTensors::open(r.written[0]);
  std::set<std::string> kv;
  for (const auto& l : ckpt.kv) kv.insert(l.source);
  for (const auto& t : in.tensors()) {
    INFO("tensor " << t.name);
    CHECK(same_bytes(in, t, out, out.at(t.name)) == (kv.count(t.name) == 0));
  }
  CHECK(meta(out, kReportMetadataKey) == R"({"x":1})");
  // The output is itself a loadable model, and re-exporting over it needs --force.
  Checkpoint again = open_checkpoint(r.path);
  CHECK(again.kv.size() == 32);
  CHECK_THROWS_WITH(export_edit(ckpt, edits, o), Catch::Contains("already exists"));
  o.force = true;
  CHECK_NOTHROW(export_edit(ckpt, edits, o));
  for (auto& e : fs::directory_iterator(tmp.path)) CHECK(e.path().filename().string()[0] != '.');
  o.output = (model / "inside").string();
  CHECK_THROWS_WITH(prepare_output(ckpt, o), Catch::Contains("inside the input model folder"));
}

TEST_CASE("export: sharded diffusers UNet, stale variants left out", "[unit]") {
  TempDir tmp;
  fs::path model = tmp.path / "sharded";
  SynthOptions so;
  so.layout = SynthLayout::Diffusers;
  so.shards = 3;
  so.seed = 5;
  write_synth_checkpoint(model.string(), so);
  Checkpoint ckpt = open_checkpoint(model.string());
  REQUIRE(ckpt.unet_index.has_value());
  // A second UNet copy that this checkpoint does not read (e.g. an old fp16 variant).
  fs::path unet = model / "unet";
  fs::path first_shard;
  for (const auto& f : ckpt.files) {
    if (f.role == "unet") first_shard = f.path;
  }
  fs::copy_file(first_shard, unet / "diffusion_pytorch_model.fp16.safetensors");
  ckpt = open_checkpoint(model.string());
  EditedWeights edits = rank2_edits(ckpt);
  ExportOptions o;
  ExportResult r = export_edit(ckpt, edits, o);
  CHECK(r.skipped == std::vector<std::string>{"unet/diffusion_pytorch_model.fp16.safetensors"});
  CHECK_FALSE(fs::exists(fs::path(r.path) / "unet/diffusion_pytorch_model.fp16.safetensors"));
  fs::path index_rel = fs::path(*ckpt.unet_index).lexically_relative(model);
  CHECK(slurp(model / index_rel) == slurp(fs::path(r.path) / index_rel));
  std::set<std::size_t> edited_files;
  for (const auto& l : ckpt.kv) edited_files.insert(l.file);
  CHECK(r.written.size() == edited_files.size());
  Checkpoint out = open_checkpoint(r.path);
  REQUIRE(out.kv.size() == ckpt.kv.size());
  for (const auto& l : out.kv) {
    at::Tensor got = load_tensor(out.files[l.file].st, out.file(l.file).at(l.source), at::kDouble);
    CHECK(at::equal(got, to_stored_dtype(edits.at(l.canonical), l.dtype).to(at::kDouble)));
  }
}
