// embed module: goldens (all tokens, last subject, float64), batching invariance, de-duplication,
// the embedding cache (hit / miss / corruption).
#include <ATen/ATen.h>

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <unistd.h>

#include "speed/checkpoint.h"
#include "speed/clip.h"
#include "speed/embed.h"
#include "speed/safetensors.h"
#include "speed/tensor.h"

using namespace speed;
namespace fs = std::filesystem;

namespace {

const std::string kGolden = std::string(SPEED_SHARED_DIR) + "/golden/";
const std::string kMerges = std::string(SPEED_SHARED_DIR) + "/data/clip/bpe_simple_vocab_16e6.txt.gz";

std::vector<std::string> golden_prompts() {
  std::ifstream in(kGolden + "encoder_prompts.txt", std::ios::binary);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

void check_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  REQUIRE(got.sizes() == want.sizes());
  at::Tensor d = (got.to(at::kDouble) - want.to(at::kDouble)).abs();
  const double m = d.max().item<double>();
  const auto idx = d.argmax().item<std::int64_t>();
  INFO(what << ": max abs diff " << m << " (tolerance " << tol << ") at flat index " << idx
            << ": got " << got.reshape(-1)[idx].item<double>() << ", expected "
            << want.reshape(-1)[idx].item<double>());
  CHECK(m <= tol);
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("speed-embed-test-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::vector<fs::path> entries(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file() && e.path().extension() == ".emb") out.push_back(e.path());
  }
  return out;
}

}  // namespace

TEST_CASE("encoder golden: all tokens, last-subject rows and indices, file and folder", "[golden]") {
  auto golden = SafeTensors::open(kGolden + "encoder_tiny.safetensors");
  at::Tensor want = tensor_view_unowned(golden, golden.at("hidden_states"));
  at::Tensor want_idx = tensor_view_unowned(golden, golden.at("last_subject_index"));
  const auto prompts = golden_prompts();
  REQUIRE(prompts.size() == 40);
  REQUIRE(want.sizes() == at::IntArrayRef({40, 77, 128}));

  for (const std::string model : {"fixture_tiny_f32.safetensors", "fixture_tiny_diffusers"}) {
    INFO(model);
    const Checkpoint ck = open_checkpoint(kGolden + model);
    Embedder emb(ck, kMerges);
    CHECK(emb.width() == 128);
    CHECK(emb.pad_id() == 49407);
    const auto tokens = emb.tokenize(prompts);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      INFO("prompt " << i << ": " << prompts[i]);
      CHECK(tokens[i].last_subject() == want_idx[static_cast<std::int64_t>(i)].item<std::int64_t>());
    }
    at::Tensor all = emb.all_tokens(prompts);
    CHECK(all.scalar_type() == at::kFloat);
    check_close(all, want, 4e-5, model + " all tokens float32");

    // Last-subject rows come from the causal prefix (ids 0..j) only.
    at::Tensor rows = emb.last_subject_rows(prompts);
    at::Tensor want_rows = want.index({at::arange(40), want_idx});
    check_close(rows, want_rows, 4e-5, model + " last-subject rows float32");
  }
  // float64 mode, limited by the golden's F32 storage.
  const Checkpoint ck = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  EmbedOptions o64;
  o64.dtype = at::kDouble;
  Embedder emb64(ck, kMerges, o64);
  check_close(emb64.all_tokens(prompts), want, 1e-6, "all tokens float64");
  check_close(emb64.last_subject_rows(prompts), want.index({at::arange(40), want_idx}), 1e-6,
              "last-subject rows float64");
}

TEST_CASE("rows do not depend on batching, length groups or duplicates", "[unit]") {
  const Checkpoint ck = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  Embedder emb(ck, kMerges);
  const std::vector<std::string> prompts = {
      "Snoopy", "a photo of a cat", "", "Snoopy", "Barack Obama", "a photo of a cat",
      "an oil painting in the style of Claude Monet, water lilies", "dog"};
  at::Tensor together = emb.last_subject_rows(prompts);
  REQUIRE(together.sizes() == at::IntArrayRef({8, 128}));
  // Each prompt alone, and from a full 77-token forward of the prompt alone.
  auto enc = TextEncoder::load(ck, 0);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    INFO(prompts[i]);
    at::Tensor alone = emb.last_subject_rows(std::vector<std::string>{prompts[i]});
    check_close(alone[0], together[static_cast<std::int64_t>(i)], 1e-5, "alone vs batch");
    const auto t = emb.tokenize({prompts[i]})[0];
    at::Tensor ids = at::empty({1, 77}, at::kLong);
    for (int j = 0; j < 77; ++j) ids[0][j] = t.ids[j];
    at::Tensor full = enc->forward(ids)[0][t.last_subject()];
    check_close(together[static_cast<std::int64_t>(i)], full, 2e-5, "vs full 77-token forward");
  }
  // Duplicates are computed once: bit-identical rows.
  CHECK(at::equal(together[0], together[3]));
  CHECK(at::equal(together[1], together[5]));
  // A tiny batch cap (one prompt per batch) changes nothing.
  EmbedOptions small;
  small.max_batch_tokens = 1;
  Embedder emb1(ck, kMerges, small);
  check_close(emb1.last_subject_rows(prompts), together, 1e-5, "batch cap 1");
  check_close(emb1.all_tokens(prompts), emb.all_tokens(prompts), 1e-5, "all tokens, batch cap 1");
  CHECK(emb.last_subject_rows(std::vector<std::string>{}).sizes() == at::IntArrayRef({0, 128}));
}

TEST_CASE("prompts sharing their first token: the shared [SOT, t1] prefix gives the same rows", "[unit]") {
  const Checkpoint ck = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  Embedder emb(ck, kMerges);
  // Five prompts start with "a" (a group), two with "barack" (too few: no group), "a" alone has
  // no tail, "dog" is alone; mixed lengths inside the group.
  const std::vector<std::string> prompts = {
      "a photo of a cat", "a dog", "barack obama", "a red car on a road", "a", "dog",
      "a painting in the style of monet", "barack", "a cat", "barack obama"};
  const auto toks = emb.tokenize(prompts);
  int group = 0;
  for (const auto& t : toks) group += t.n >= 4 && t.ids[1] == toks[0].ids[1];
  REQUIRE(group >= 4);  // the group path is taken
  const at::Tensor together = emb.last_subject_rows(prompts);
  auto enc = TextEncoder::load(ck, 0);
  EmbedOptions one;  // one prompt per call: never grouped
  one.max_batch_tokens = 1;
  Embedder emb1(ck, kMerges, one);
  const at::Tensor separate = emb1.last_subject_rows(prompts);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    INFO(prompts[i]);
    const auto r = static_cast<std::int64_t>(i);
    check_close(together[r], separate[r], 1e-5, "grouped vs one prompt per call");
    const auto& t = toks[i];
    at::Tensor ids = at::empty({1, 77}, at::kLong);
    for (int j = 0; j < 77; ++j) ids[0][j] = t.ids[j];
    check_close(together[r], enc->forward(ids)[0][t.last_subject()], 2e-5, "vs full 77-token forward");
  }
  CHECK(at::equal(together[2], together[9]));
}

TEST_CASE("several lists in one call, both modes: the rows of each list alone", "[unit]") {
  const Checkpoint ck = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  Embedder emb(ck, kMerges);
  // Lists that share prompts, first tokens (a group of four "a ..." across the lists) and
  // lengths, across modes; the empty prompt in both modes; an empty list.
  const std::vector<std::string> a = {"a photo of a cat", "a dog", "Snoopy", "", "a red car"};
  const std::vector<std::string> b = {"", "Snoopy", "a dog"};
  const std::vector<std::string> c = {"a painting of a dog", "Barack Obama", "a dog"};
  const std::vector<std::string> none;
  const auto ta = emb.tokenize(a), tb = emb.tokenize(b), tc = emb.tokenize(c);
  const auto tn = emb.tokenize(none);
  const std::vector<at::Tensor> out =
      emb.embed({{&ta, false}, {&tb, true}, {&tc, false}, {&tn, true}, {&tb, false}});
  REQUIRE(out.size() == 5);
  EmbedOptions one;  // one prompt per call, each list alone
  one.max_batch_tokens = 1;
  Embedder emb1(ck, kMerges, one);
  check_close(out[0], emb1.last_subject_rows(a), 1e-5, "list a, last subject");
  check_close(out[1], emb1.all_tokens(b), 1e-5, "list b, all tokens");
  check_close(out[2], emb1.last_subject_rows(c), 1e-5, "list c, last subject");
  CHECK(out[3].sizes() == at::IntArrayRef({0, 77, 128}));
  check_close(out[4], emb1.last_subject_rows(b), 1e-5, "list b, last subject");
  // The empty prompt's last-subject row is its SOT row, the first of its 77.
  check_close(out[0][3], out[1][0][0], 1e-5, "\"\" last subject vs all tokens row 0");
  // A prompt in two lists of the same mode is computed once: the same bytes.
  CHECK(at::equal(out[0][1], out[2][2]));
  CHECK(at::equal(out[4][0], out[0][3]));
}

TEST_CASE("embedding cache: miss, hit, corruption detected and recomputed", "[unit]") {
  TempDir tmp;
  const Checkpoint ck = open_checkpoint(kGolden + "fixture_tiny_f32.safetensors");
  EmbedOptions o;
  o.cache_dir = tmp.path.string();
  const std::vector<std::string> prompts = {"Snoopy", "Mickey Mouse", "Snoopy", ""};

  Embedder cold(ck, kMerges, o);
  at::Tensor r1 = cold.last_subject_rows(prompts);
  CHECK(cold.cache_hits() == 0);
  CHECK(cold.cache_misses() == 3);  // duplicates are looked up once
  auto files = entries(tmp.path);
  CHECK(files.size() == 3);
  for (const auto& f : files) {
    CHECK(f.parent_path().parent_path().filename() == cold.weights_hash());
  }
  at::Tensor a1 = cold.all_tokens(prompts);
  CHECK(entries(tmp.path).size() == 6);  // another mode, other entries

  CHECK(cold.weights_loaded());
  Embedder warm(ck, kMerges, o);
  at::Tensor r2 = warm.last_subject_rows(prompts);
  CHECK(warm.cache_hits() == 3);
  CHECK(warm.cache_misses() == 0);
  CHECK_FALSE(warm.weights_loaded());  // every row from the cache: no float32 copy of the weights
  CHECK(warm.weights_hash() == cold.weights_hash());
  CHECK(at::equal(r1, r2));  // exact bytes from the cache
  CHECK(at::equal(a1, warm.all_tokens(prompts)));

  // Corrupt every last-subject entry in a different way: truncated, flipped payload byte, garbage.
  std::vector<fs::path> small;
  for (const auto& f : entries(tmp.path)) {
    if (fs::file_size(f) < 4096) small.push_back(f);
  }
  REQUIRE(small.size() == 3);
  fs::resize_file(small[0], fs::file_size(small[0]) - 9);
  {
    std::fstream io(small[1], std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(100);
    char c;
    io.read(&c, 1);
    io.seekp(100);
    c = static_cast<char>(c ^ 0x40);
    io.write(&c, 1);
  }
  {
    const auto n = fs::file_size(small[2]);
    std::ofstream out(small[2], std::ios::binary | std::ios::trunc);
    out << std::string(n, 'x');
  }
  Embedder again(ck, kMerges, o);
  at::Tensor r3 = again.last_subject_rows(prompts);
  CHECK(again.cache_misses() == 3);
  CHECK(at::equal(r1, r3));
  // The entries were rewritten and are valid again.
  Embedder fourth(ck, kMerges, o);
  CHECK(at::equal(fourth.last_subject_rows(prompts), r1));
  CHECK(fourth.cache_hits() == 3);
  // No temp files left behind.
  for (const auto& e : fs::recursive_directory_iterator(tmp.path)) {
    CHECK(e.path().extension() != ".tmp");
  }
  // float64 results have their own entries.
  EmbedOptions o64 = o;
  o64.dtype = at::kDouble;
  Embedder e64(ck, kMerges, o64);
  e64.last_subject_rows(prompts);
  CHECK(e64.cache_hits() == 0);
}

TEST_CASE("default cache dir follows XDG_CACHE_HOME, then HOME", "[unit]") {
  const char* old_xdg = std::getenv("XDG_CACHE_HOME");
  const std::string keep_xdg = old_xdg ? old_xdg : "";
  const char* old_home = std::getenv("HOME");
  const std::string keep_home = old_home ? old_home : "";
  ::setenv("XDG_CACHE_HOME", "/tmp/xdg-test", 1);
  CHECK(default_cache_dir() == std::optional<std::string>("/tmp/xdg-test/speed-erase"));
  ::setenv("XDG_CACHE_HOME", "relative", 1);  // the XDG spec says ignore relative paths
  ::setenv("HOME", "/home/someone", 1);
  CHECK(default_cache_dir() == std::optional<std::string>("/home/someone/.cache/speed-erase"));
  if (old_xdg) ::setenv("XDG_CACHE_HOME", keep_xdg.c_str(), 1); else ::unsetenv("XDG_CACHE_HOME");
  if (old_home) ::setenv("HOME", keep_home.c_str(), 1); else ::unsetenv("HOME");
}
