// bench-encode (hidden: run by scripts/bench-encode, never by ctest). Prints figures, asserts
// nothing about speed: a full-size synthetic CLIP-L text encoder (seeded, fp16 storage), the
// 100 + 100 celebrity names of the paper's task in last-subject mode vs full 77-token prompts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <catch2/catch.hpp>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "speed/clip.h"
#include "speed/embed.h"
#include "speed/safetensors.h"
#include "speed/tokenizer.h"

using namespace speed;
namespace fs = std::filesystem;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Minimal CSV (quoted fields with "" escapes): the `concept` column, split by `type`.
void read_celebrities(const std::string& path, std::vector<std::string>& erase, std::vector<std::string>& retain) {
  std::ifstream in(path);
  std::string line;
  std::vector<std::string> header;
  std::set<std::string> seen;
  auto split = [](const std::string& l) {
    std::vector<std::string> f(1);
    bool q = false;
    for (std::size_t i = 0; i < l.size(); ++i) {
      char c = l[i];
      if (q && c == '"' && i + 1 < l.size() && l[i + 1] == '"') { f.back() += '"'; ++i; }
      else if (c == '"') q = !q;
      else if (c == ',' && !q) f.emplace_back();
      else if (c != '\r') f.back() += c;
    }
    return f;
  };
  std::getline(in, line);
  header = split(line);
  const auto col = [&](const char* n) { return std::find(header.begin(), header.end(), n) - header.begin(); };
  const auto ct = col("type"), cc = col("concept");
  while (std::getline(in, line)) {
    auto f = split(line);
    if (f.size() <= std::size_t(std::max(ct, cc)) || !seen.insert(f[cc]).second) continue;
    (f[ct] == "erase" ? erase : retain).push_back(f[cc]);
  }
}

void set_threads(int n) {
  at::set_num_threads(n);
  // OpenBLAS-pthread keeps its own pool (build-env.md trap 6): size it the same.
  using SetFn = void (*)(int);
  if (auto f = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) f(n);
}

template <typename F>
double median_time(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now();
    f();
    t.push_back(now() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

TEST_CASE("bench-encode: CLIP-L, celebrity names, last subject vs 77 tokens", "[.bench]") {
  const char* env_dir = std::getenv("SPEED_BENCH_DIR");
  const fs::path dir = env_dir ? env_dir : fs::temp_directory_path() / "speed-bench";
  fs::create_directories(dir);
  const fs::path model = dir / "clip_l_text_fp16_seed1234.safetensors";
  TextEncoderInfo info;  // CLIP ViT-L/14 text defaults (768 x 12, 12 heads, MLP 3072, QuickGELU)
  info.prefix = "text_model.";
  if (!fs::exists(model)) {
    const double t0 = now();
    write_synthetic_text_encoder(model.string(), info, Dtype::F16, 1234);
    std::printf("generated %s (%.0f MB) in %.1f s\n", model.c_str(), fs::file_size(model) / 1e6, now() - t0);
  }
  Checkpoint ck;
  ck.path = model.string();
  ck.files.push_back({model.string(), "text_encoder", std::make_shared<const SafeTensors>(SafeTensors::open(model.string()))});
  ck.text_encoders.push_back(info);

  std::vector<std::string> erase, retain;
  read_celebrities(std::string(SPEED_SHARED_DIR) + "/data/speed/100_celebrity.csv", erase, retain);
  std::vector<std::string> names = erase;
  names.insert(names.end(), retain.begin(), retain.end());
  const std::string merges = std::string(SPEED_SHARED_DIR) + "/data/clip/bpe_simple_vocab_16e6.txt.gz";

  double t0 = now();
  Embedder emb(ck, merges);
  const double t_load = now() - t0;
  t0 = now();
  const std::string hash = emb.weights_hash();
  const double t_hash = now() - t0;
  const auto tokens = emb.tokenize(names);
  std::int64_t tok_a = 0;
  for (const auto& t : tokens) tok_a += t.last_subject();  // the shared SOT runs once per call
  tok_a += 1;
  const std::int64_t tok_b = 77 * static_cast<std::int64_t>(names.size());
  const double params = 12.0 * (4.0 * 768 * 768 + 2.0 * 768 * 3072);  // per token, per forward
  std::printf("model: synthetic CLIP-L text encoder, fp16 storage, %.0f MB; load %.2f s; weights hash (XXH64, all bytes) %.3f s = %s\n",
              fs::file_size(model) / 1e6, t_load, t_hash, hash.c_str());
  std::printf("prompts: %zu celebrity names (%zu erase + %zu retain), %lld tokens computed in last-subject mode (mean %.2f per name + one shared SOT), %lld in 77-token mode\n",
              names.size(), erase.size(), retain.size(), static_cast<long long>(tok_a),
              double(tok_a - 1) / names.size(), static_cast<long long>(tok_b));
  for (int threads : {1, 2}) {
    set_threads(threads);
    emb.last_subject_rows(tokens);  // warm-up (page cache, allocator)
    const double ta = median_time(5, [&] { emb.last_subject_rows(tokens); });
    const double tb = median_time(2, [&] { emb.all_tokens(tokens); });
    std::printf("threads %d: (a) last subject %.3f s = %.0f tokens/s, %.1f GFLOP/s | (b) 77 tokens %.3f s = %.0f tokens/s, %.1f GFLOP/s | per prompt (a) %.2f ms, (b) %.1f ms, ratio (a)/(b) = %.3f (%.1fx faster)\n",
                threads, ta, tok_a / ta, 2 * params * tok_a / ta / 1e9, tb, tok_b / tb,
                2 * params * tok_b / tb / 1e9, 1e3 * ta / names.size(), 1e3 * tb / names.size(), ta / tb,
                tb / ta);
  }
  std::fflush(stdout);
}
