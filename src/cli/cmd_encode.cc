// `speed-erase encode --model PATH --prompts FILE --output OUT.safetensors [--tokenizer PATH]`:
// the text encoder's full hidden states, as the UNet sees them (SPEC §3).
//
// Prompt file: UTF-8, one prompt per line, positional (row i = line i), so nothing is skipped:
// an empty line is the empty prompt and '#' is ordinary text. LF or CRLF line ends (one
// trailing CR is removed); a final newline does not add a prompt; a UTF-8 BOM is dropped.
#include <ATen/Parallel.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "commands.h"
#include "speed/checkpoint.h"
#include "speed/concepts.h"
#include "speed/embed.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/safetensors.h"
#include "speed/tensor.h"
#include "speed/version.h"

namespace speed::cli {
namespace {

constexpr std::uintmax_t kMaxPromptFile = 64ull << 20;
constexpr std::size_t kMaxPrompts = 100'000;  // 100k x 77 x 768 floats is already 23 GB

std::vector<std::string> read_prompt_lines(const std::string& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw UsageError(fmt::format("cannot read prompts file '{}': {}", path, ec.message()));
  SPEED_CHECK(size <= kMaxPromptFile, "prompts file '{}' has {} bytes, the limit is {}", path, size,
              kMaxPromptFile);
  std::ifstream in(path, std::ios::binary);
  SPEED_CHECK(in.good(), "cannot open prompts file '{}'", path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);
  check_utf8(text, path);
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t nl = text.find('\n', start);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(start, nl - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    SPEED_CHECK(lines.size() <= kMaxPrompts, "prompts file '{}' has more than {} lines", path,
                kMaxPrompts);
    start = nl + 1;
  }
  if (lines.empty()) throw UsageError(fmt::format("prompts file '{}' has no prompts", path));
  return lines;
}

}  // namespace

SPEED_CLI_COMMAND(encode) {
  struct Options {
    std::string model, prompts, output, device = "cpu", cache_dir;
    std::optional<std::string> tokenizer;
    bool no_cache = false, force = false;
    int threads = 0;
  };
  auto a = std::make_shared<Options>();
  auto* sub = app.add_subcommand(
      "encode", "write the text encoder's hidden states [N,77,d] and last-subject indices of each prompt line");
  sub->add_option("--model", a->model, "checkpoint: .safetensors file or diffusers folder")->required();
  sub->add_option("--prompts", a->prompts, "UTF-8 text file, one prompt per line (empty line = empty prompt)")
      ->required();
  sub->add_option("--output", a->output, "output .safetensors (F32 hidden_states, I64 last_subject_index)")
      ->required();
  sub->add_option("--tokenizer", a->tokenizer, "CLIP merges file or diffusers tokenizer/ folder");
  sub->add_option("--device", a->device, "cpu (default) or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  sub->add_option("--threads", a->threads, "CPU threads (default: LibTorch's)")->check(CLI::Range(0, 1024));
  sub->add_flag("--no-cache", a->no_cache, "do not read or write the embedding cache");
  sub->add_option("--cache-dir", a->cache_dir, "embedding cache folder (default ~/.cache/speed-erase)");
  sub->add_flag("--force", a->force, "overwrite an existing output file");
  sub->add_flag_function("-q,--quiet", [&globals](std::int64_t) { globals.verbosity = -1; }, "warnings only");
  sub->add_flag_function("-v,--verbose", [&globals](std::int64_t) { globals.verbosity = 1; }, "debug output");
  sub->callback([&action, a] {
    action = [a] {
      const auto t0 = std::chrono::steady_clock::now();
      if (std::filesystem::exists(a->output) && !a->force) {
        throw UsageError(fmt::format("output '{}' exists", a->output), "pass --force to overwrite it");
      }
      if (a->threads > 0) at::set_num_threads(a->threads);
      const std::vector<std::string> prompts = read_prompt_lines(a->prompts);
      const Checkpoint ckpt = open_checkpoint(a->model);
      EmbedOptions eo;
      eo.device = a->device;
      if (!a->no_cache) eo.cache_dir = a->cache_dir.empty() ? default_cache_dir() : a->cache_dir;
      Embedder emb(ckpt, a->tokenizer, eo);
      const auto tokens = emb.tokenize(prompts);
      at::Tensor states = emb.all_tokens(tokens);
      at::Tensor index = at::empty({static_cast<std::int64_t>(tokens.size())}, at::kLong);
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        index[static_cast<std::int64_t>(i)] = tokens[i].last_subject();
        if (tokens[i].truncated) log().warn("prompt on line {} is longer than 75 tokens and was truncated", i + 1);
      }
      const auto hs = tensor_bytes("hidden_states", states.to(at::kFloat));
      const auto li = tensor_bytes("last_subject_index", index);
      write_safetensors(a->output, {hs.data, li.data},
                        {{"format", "pt"},
                         {"speed_erase.version", kVersion},
                         {"speed_erase.model", a->model},
                         {"speed_erase.encoder_hash", emb.weights_hash()}},
                        a->force);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      log().info("encoded {} prompts [{}, 77, {}] into '{}' in {:.2f} s ({} cached)", prompts.size(),
                 prompts.size(), emb.width(), a->output, s, emb.cache_hits());
      return 0;
    };
  });
}

}  // namespace speed::cli
