// `speed-erase tokenize` end to end with CLIP tokenizer files (the real LibTorch-linked binary).
#include <sys/stat.h>

#include <cstdio>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include "speed/tokenizer.h"

namespace {

std::string run_cli(const std::string& args, int* status) {
  std::string out;
  FILE* p = popen((std::string(SPEED_ERASE_BIN) + " " + args + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int rc = pclose(p);
  *status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  return out;
}

}  // namespace

TEST_CASE("speed-erase tokenize prints 77 ids per text", "[e2e]") {
  struct stat st {};
  INFO("the CLI '" SPEED_ERASE_BIN "' must be built (tests/CMakeLists.txt makes every test depend on it)");
  REQUIRE(::stat(SPEED_ERASE_BIN, &st) == 0);
  const std::string gz = SPEED_SHARED_DIR "/data/clip/bpe_simple_vocab_16e6.txt.gz";
  const std::string dir = SPEED_SHARED_DIR "/golden/fixture_tiny_diffusers/tokenizer";
  auto tok = speed::ClipTokenizer::from_merges_file(gz);
  int status = 0;
  std::string out = run_cli("tokenize --tokenizer " + gz + " 'a photo of a cat' 'Van Gogh' ''", &status);
  INFO("output: " << out);
  REQUIRE(status == 0);
  std::istringstream lines(out);
  std::string line;
  for (const char* text : {"a photo of a cat", "Van Gogh", ""}) {
    REQUIRE(std::getline(lines, line));
    auto ids = nlohmann::json::parse(line).get<std::vector<std::int32_t>>();
    auto want = tok.tokenize(text);
    CHECK(ids == std::vector<std::int32_t>(want.ids.begin(), want.ids.end()));
  }
  CHECK_FALSE(std::getline(lines, line));

  out = run_cli("tokenize --tokenizer " + dir + " --pad-id 0 'a photo of a cat'", &status);
  REQUIRE(status == 0);
  auto ids = nlohmann::json::parse(out).get<std::vector<int>>();
  REQUIRE(ids.size() == 77);
  CHECK(ids[6] == 49407);
  CHECK(ids[7] == 0);

  out = run_cli("tokenize --tokenizer " + gz + " --pad-id 49408 x", &status);
  CHECK(status == 2);
  CHECK(out.find("error: --pad-id 49408 is out of range") != std::string::npos);
  out = run_cli("tokenize --tokenizer /nonexistent.gz x", &status);
  CHECK(status == 1);
  CHECK(out.find("error: tokenizer '/nonexistent.gz' does not exist") != std::string::npos);
  out = run_cli("tokenize --tokenizer " + gz + " --max-length 10 x", &status);
  CHECK(status == 2);
  out = run_cli("tokenize --tokenizer " + gz, &status);
  CHECK(status == 2);
}
