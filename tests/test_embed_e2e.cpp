// `speed-erase encode` end to end: the real binary against the encoder golden, on the single
// file and the diffusers folder; prompt-file rules (CRLF, empty lines, BOM); exit statuses.
#include <ATen/ATen.h>

#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "speed/checkpoint.h"
#include "speed/embed.h"
#include "speed/safetensors.h"
#include "speed/tensor.h"

using namespace speed;
namespace fs = std::filesystem;

namespace {

const std::string kGolden = std::string(SPEED_SHARED_DIR) + "/golden/";
const std::string kMerges = std::string(SPEED_SHARED_DIR) + "/data/clip/bpe_simple_vocab_16e6.txt.gz";

// Runs the CLI; returns its exit status, stderr in `err`.
int run_cli(const std::string& args, std::string& err) {
  const fs::path log = fs::temp_directory_path() / ("speed-e2e-err-" + std::to_string(::getpid()));
  const std::string cmd = std::string("OMP_WAIT_POLICY=PASSIVE '") + SPEED_ERASE_BIN + "' " + args +
                          " 2> '" + log.string() + "'";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(log);
  err.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  fs::remove(log);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

TEST_CASE("speed-erase encode matches the encoder golden", "[e2e][golden]") {
  REQUIRE(fs::exists(SPEED_ERASE_BIN));
  const fs::path dir = fs::temp_directory_path() / ("speed-e2e-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto golden = SafeTensors::open(kGolden + "encoder_tiny.safetensors");
  at::Tensor want = tensor_view_unowned(golden, golden.at("hidden_states"));
  at::Tensor want_idx = tensor_view_unowned(golden, golden.at("last_subject_index"));

  int k = 0;
  for (const std::string model : {"fixture_tiny_f32.safetensors", "fixture_tiny_diffusers"}) {
    INFO(model);
    const std::string out = (dir / ("out" + std::to_string(k++) + ".safetensors")).string();
    std::string err;
    const int rc = run_cli("encode --model '" + kGolden + model + "' --prompts '" + kGolden +
                               "encoder_prompts.txt' --output '" + out + "' --tokenizer '" + kMerges +
                               "' --cache-dir '" + (dir / "cache").string() + "'",
                           err);
    INFO(err);
    REQUIRE(rc == 0);
    auto got = SafeTensors::open(out);
    CHECK(got.at("hidden_states").dtype == Dtype::F32);
    CHECK(got.at("last_subject_index").dtype == Dtype::I64);
    at::Tensor hs = tensor_view_unowned(got, got.at("hidden_states"));
    REQUIRE(hs.sizes() == want.sizes());
    const double m = (hs - want).abs().max().item<double>();
    INFO("max abs diff " << m << " vs tolerance 4e-5");
    CHECK(m <= 4e-5);
    CHECK(at::equal(tensor_view_unowned(got, got.at("last_subject_index")), want_idx));
  }
  // The second run of the single file hits the cache: same bytes.
  {
    std::string err;
    const std::string out = (dir / "again.safetensors").string();
    REQUIRE(run_cli("encode --model '" + kGolden + "fixture_tiny_f32.safetensors' --prompts '" + kGolden +
                        "encoder_prompts.txt' --output '" + out + "' --tokenizer '" + kMerges +
                        "' --cache-dir '" + (dir / "cache").string() + "'",
                    err) == 0);
    INFO(err);  // every unique id sequence (37 of the 40 prompts) comes from the cache
    CHECK(err.find("(37 cached)") != std::string::npos);
    auto a = SafeTensors::open(out), b = SafeTensors::open((dir / "out0.safetensors").string());
    CHECK(at::equal(tensor_view_unowned(a, a.at("hidden_states")), tensor_view_unowned(b, b.at("hidden_states"))));
  }
  // Existing output: usage error, exit 2, file untouched.
  {
    std::string err;
    const auto before = fs::file_size(dir / "out0.safetensors");
    CHECK(run_cli("encode --model '" + kGolden + "fixture_tiny_f32.safetensors' --prompts '" + kGolden +
                      "encoder_prompts.txt' --output '" + (dir / "out0.safetensors").string() +
                      "' --tokenizer '" + kMerges + "' --no-cache",
                  err) == 2);
    CHECK(err.find("error: output '") != std::string::npos);
    CHECK(err.find("hint: pass --force") != std::string::npos);
    CHECK(fs::file_size(dir / "out0.safetensors") == before);
  }
  // Prompt-file rules: BOM dropped, CRLF accepted, an empty line is the empty prompt, '#' is text,
  // no final newline needed.
  {
    const fs::path prompts = dir / "p.txt";
    std::ofstream(prompts, std::ios::binary) << "\xEF\xBB\xBFSnoopy\r\n\r\n# not a comment\nMickey Mouse";
    const std::string out = (dir / "p.safetensors").string();
    std::string err;
    REQUIRE(run_cli("encode --model '" + kGolden + "fixture_tiny_f32.safetensors' --prompts '" +
                        prompts.string() + "' --output '" + out + "' --tokenizer '" + kMerges + "' --no-cache",
                    err) == 0);
    auto got = SafeTensors::open(out);
    at::Tensor hs = tensor_view_unowned(got, got.at("hidden_states"));
    REQUIRE(hs.sizes() == at::IntArrayRef({4, 77, 128}));
    Embedder emb(open_checkpoint(kGolden + "fixture_tiny_f32.safetensors"), kMerges);
    at::Tensor lib = emb.all_tokens(std::vector<std::string>{"Snoopy", "", "# not a comment", "Mickey Mouse"});
    CHECK((hs - lib).abs().max().item<double>() <= 1e-6);
    at::Tensor idx = tensor_view_unowned(got, got.at("last_subject_index"));
    CHECK(idx[1].item<std::int64_t>() == 0);
  }
  // Missing prompts file: usage error naming it.
  {
    std::string err;
    CHECK(run_cli("encode --model '" + kGolden + "fixture_tiny_f32.safetensors' --prompts /nonexistent/p.txt --output '" +
                      (dir / "x.safetensors").string() + "' --no-cache",
                  err) == 2);
    CHECK(err.find("'/nonexistent/p.txt'") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  }
  fs::remove_all(dir);
}
