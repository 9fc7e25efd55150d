// e2e: `speed-erase inspect` on the golden fixtures (text and --json) and on a bad file.
#include <sys/wait.h>

#include <cstdio>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

using Catch::Matchers::Contains;

namespace {

struct Run {
  int status = -1;
  std::string out;
};

// Runs the CLI with stderr folded into the captured output.
Run run(const std::string& args) {
  Run r;
  const std::string cmd = std::string("'") + SPEED_ERASE_BIN + "' " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

const std::string kGolden = std::string(SPEED_SHARED_DIR) + "/golden/";

}  // namespace

TEST_CASE("inspect: golden single file, text and JSON", "[e2e]") {
  auto text = run("inspect '" + kGolden + "fixture_tiny_f32.safetensors'");
  CAPTURE(text.out);
  REQUIRE(text.status == 0);
  CHECK_THAT(text.out, Contains("family:       sd1"));
  CHECK_THAT(text.out, Contains("layout:       single-file (UNet: ldm names, prefix 'model.diffusion_model.')"));
  CHECK_THAT(text.out, Contains("K/V layers:   16 (32 tensors)"));
  CHECK_THAT(text.out, Contains("EMA:          5 model_ema.* tensors, 3 K/V twins"));
  CHECK_THAT(text.out, Contains("width 128, 2 layers, 2 heads, mlp 512, quick_gelu"));

  auto js = run("inspect --json '" + kGolden + "fixture_tiny_f32.safetensors'");
  REQUIRE(js.status == 0);
  auto j = nlohmann::ordered_json::parse(js.out);
  CHECK(j["family"] == "sd1");
  CHECK(j["layout"] == "single-file");
  CHECK(j["size_bytes"] == 18721700);
  CHECK(j["unet"]["kv_layers"] == 16);
  CHECK(j["unet"]["context_dim"] == 128);
  REQUIRE(j["kv"].size() == 32);
  CHECK(j["kv"][0]["name"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight");
  CHECK(j["kv"][31]["name"] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight");
  CHECK(j["text_encoders"][0]["heads"] == 2);
  CHECK(j["text_encoders"][0]["activation"] == "quick_gelu");
  CHECK(j["ema"]["kv_twins"] == 3);
  // Key order is part of the contract for scripts.
  std::vector<std::string> keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
  CHECK(keys == std::vector<std::string>{"path", "family", "layout", "size_bytes", "dtypes", "files", "unet", "detection",
                                         "text_encoders", "tokenizer", "ema", "kv"});
  // Deterministic output.
  CHECK(run("inspect --json '" + kGolden + "fixture_tiny_f32.safetensors'").out == js.out);
}

TEST_CASE("inspect: golden diffusers folder and failures", "[e2e]") {
  auto js = run("inspect --json '" + kGolden + "fixture_tiny_diffusers'");
  REQUIRE(js.status == 0);
  auto j = nlohmann::ordered_json::parse(js.out);
  CHECK(j["layout"] == "diffusers");
  CHECK(j["unet"]["kv_tensors"] == 32);
  CHECK(j["tokenizer"] == kGolden + "fixture_tiny_diffusers/tokenizer");

  auto bad = run("inspect '" + kGolden + "tokenizer_cases.json'");
  CHECK(bad.status == 1);
  CHECK_THAT(bad.out, Contains("error: '" + kGolden + "tokenizer_cases.json': header length"));
  auto missing = run("inspect /nonexistent/model.safetensors");
  CHECK(missing.status == 1);
  CHECK_THAT(missing.out, Contains("error: cannot open '/nonexistent/model.safetensors'"));
  auto usage = run("inspect");
  CHECK(usage.status == 2);
}
