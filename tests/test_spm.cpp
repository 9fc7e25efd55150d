// sentencepiece (T5) tokenizer through the dlmopen'ed module: a tiny model trained here with
// sentencepiece's own spm_train, ids compared with spm_encode, T5 conventions, hostile models,
// and the real (LibTorch-linked) CLI.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include "speed/error.h"
#include "speed/spm.h"
#include "test_support.h"

namespace {

using speed::test::require_error;

const std::string kShared = SPEED_SHARED_DIR;

std::string run(const std::string& cmd, int* status = nullptr) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int rc = pclose(p);
  if (status) *status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  return out;
}

// The test texts: prompts of several scripts, plus strings sentencepiece normalises (NFKC,
// whitespace runs) and unknown characters.
std::vector<std::string> texts() {
  return {"a photo of a cat",
          "Van Gogh painting of a starry night",
          "  leading and   repeated   spaces ",
          "Ｆｕｌｌｗｉｄｔｈ text and ﬁ ligature",
          "unknown chars: 中文 😀 ✓",
          "",
          "x",
          "The quick brown fox jumps over the lazy dog, 1234567890!"};
}

struct Model {
  std::string dir, path;
};

// Trains a 300-piece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos).
const Model& tiny_model() {
  static const Model m = [] {
    char tmpl[] = "/tmp/speed_spm_test_XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    Model model{tmpl, std::string(tmpl) + "/tiny.model"};
    static const std::string cleanup = "rm -rf '" + model.dir + "'";
    std::atexit([] { (void)std::system(cleanup.c_str()); });
    std::ofstream corpus(model.dir + "/corpus.txt");
    std::ifstream coco(kShared + "/data/speed/mscoco.csv");
    std::string line;
    std::getline(coco, line);
    for (int i = 0; i < 3000 && std::getline(coco, line); ++i) corpus << line.substr(line.find(',') + 1) << "\n";
    corpus.close();
    int status = 0;
    std::string log = run("spm_train --input=" + model.dir + "/corpus.txt --model_prefix=" + model.dir +
                              "/tiny --vocab_size=300 --model_type=unigram --pad_id=0 --eos_id=1 --unk_id=2"
                              " --bos_id=-1 --minloglevel=2 2>&1",
                          &status);
    INFO(log);
    REQUIRE(status == 0);
    return model;
  }();
  return m;
}

std::vector<std::int32_t> spm_encode_ids(const std::string& model, const std::string& text) {
  const std::string in = tiny_model().dir + "/in.txt";
  {
    std::ofstream f(in, std::ios::binary);
    f << text << "\n";
  }
  std::istringstream out(run("spm_encode --model=" + model + " --output_format=id < " + in));
  std::vector<std::int32_t> ids;
  int id;
  while (out >> id) ids.push_back(id);
  return ids;
}

std::string join(const std::vector<std::int32_t>& ids) {
  std::string s;
  for (auto id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return s;
}


}  // namespace

TEST_CASE("sentencepiece ids agree with spm_encode", "[unit]") {
  const auto& m = tiny_model();
  auto t = speed::SpmTokenizer::load(m.path);
  CHECK(t.vocab_size() == 300);
  CHECK(t.eos_id() == 1);
  CHECK(t.pad_id() == 0);
  for (const auto& text : texts()) {
    auto want = spm_encode_ids(m.path, text);
    auto got = t.encode(text);
    INFO("text '" << text << "'\n  spm_encode " << join(want) << "\n  ours       " << join(got));
    CHECK(got == want);
  }
}

TEST_CASE("T5 conventions: EOS, padding, truncation", "[unit]") {
  auto t = speed::SpmTokenizer::load(tiny_model().path);
  auto content = t.encode("a photo of a cat");
  auto p = t.tokenize("a photo of a cat");
  REQUIRE(p.ids.size() == 77);
  CHECK(p.n == static_cast<int>(content.size()) + 1);
  CHECK(std::vector<std::int32_t>(p.ids.begin(), p.ids.begin() + content.size()) == content);
  CHECK(p.ids[content.size()] == 1);
  for (std::size_t i = content.size() + 1; i < 77; ++i) CHECK(p.ids[i] == 0);
  CHECK_FALSE(p.truncated);

  auto e = t.tokenize("");
  CHECK(e.n == 1);
  CHECK(e.ids[0] == 1);

  std::string long_text;
  for (int i = 0; i < 200; ++i) long_text += "photo ";
  auto l = t.tokenize(long_text, 256);
  CHECK(l.ids.size() == 256);
  auto s = t.tokenize(long_text, 77, 5);
  CHECK(s.truncated);
  CHECK(s.n == 77);
  CHECK(s.ids[76] == 1);
  auto padded = t.tokenize("cat", 10, 7);
  CHECK(padded.ids.back() == 7);
  CHECK_THROWS_AS(t.tokenize("a", 0), speed::Error);
  CHECK_THROWS_AS(t.tokenize("a", 77, 300), speed::Error);
}

TEST_CASE("hostile sentencepiece models give clear errors", "[unit]") {
  require_error([] { speed::SpmTokenizer::from_bytes(""); }, "is empty");
  require_error([] { speed::SpmTokenizer::from_bytes("this is not a protobuf"); }, "does not load");
  require_error([] { speed::SpmTokenizer::from_bytes(std::string("\x0a\xff\xff\xff\xff\x0f", 6)); }, "does not load");
  require_error([] { speed::SpmTokenizer::load("/nonexistent/m.model"); }, "cannot open sentencepiece model");
  std::ifstream f(tiny_model().path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // Every truncation of a real model either loads or fails cleanly.
  for (std::size_t cut = 1; cut < bytes.size(); cut += 97) {
    try {
      auto t = speed::SpmTokenizer::from_bytes(bytes.substr(0, cut));
      (void)t.encode("a photo");
    } catch (const speed::Error&) {
    }
  }
  // Invalid UTF-8 text does not crash.
  auto t = speed::SpmTokenizer::from_bytes(bytes);
  (void)t.encode("\xff\xfe bad \xc3");
  CHECK(speed::is_spm_model_path("a/spiece.model"));
  CHECK_FALSE(speed::is_spm_model_path("bpe_simple_vocab_16e6.txt.gz"));
  ::setenv("SPEED_ERASE_SPM_MODULE", "/nonexistent/lib.so", 1);
  require_error([] { speed::find_spm_module(); }, "$SPEED_ERASE_SPM_MODULE");
  ::unsetenv("SPEED_ERASE_SPM_MODULE");
  CHECK_FALSE(speed::find_spm_module().empty());
}

TEST_CASE("speed-erase tokenize with a .model file (LibTorch-linked process)", "[e2e]") {
  struct stat st {};
  INFO("the CLI '" SPEED_ERASE_BIN "' must be built (tests/CMakeLists.txt makes every test depend on it)");
  REQUIRE(::stat(SPEED_ERASE_BIN, &st) == 0);
  const auto& m = tiny_model();
  auto t = speed::SpmTokenizer::load(m.path);
  int status = 0;
  std::string out = run(std::string(SPEED_ERASE_BIN) + " tokenize --tokenizer " + m.path +
                            " 'a photo of a cat' 'Van Gogh' 2>&1",
                        &status);
  INFO("output: " << out);
  REQUIRE(status == 0);
  std::istringstream lines(out);
  std::string line;
  for (const char* text : {"a photo of a cat", "Van Gogh"}) {
    REQUIRE(std::getline(lines, line));
    auto ids = nlohmann::json::parse(line).get<std::vector<std::int32_t>>();
    CHECK(ids == t.tokenize(text).ids);
  }
  std::string longer = run(std::string(SPEED_ERASE_BIN) + " tokenize --tokenizer " + m.path +
                           " --max-length 256 'cat' 2>&1", &status);
  CHECK(status == 0);
  CHECK(nlohmann::json::parse(longer).size() == 256);
}
