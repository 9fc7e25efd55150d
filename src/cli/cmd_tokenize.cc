// `speed-erase tokenize [--tokenizer PATH] [--pad-id ID] [--max-length N] TEXT...`: one JSON
// array of ids per TEXT on stdout (SPEC §3). CLIP files give 77 ids with SD semantics; a
// sentencepiece `.model` gives T5 ids (content, EOS, padding to --max-length).
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "speed/error.h"
#include "speed/spm.h"
#include "speed/tokenizer.h"

namespace speed::cli {

SPEED_CLI_COMMAND(tokenize) {
  struct Options {
    std::vector<std::string> texts;
    std::optional<std::string> tokenizer;
    std::optional<int> pad_id;
    int max_length = kContext;
  };
  auto opts = std::make_shared<Options>();
  auto* sub = app.add_subcommand("tokenize", "print the token ids of each TEXT, one JSON array per line");
  sub->add_option("text", opts->texts, "prompts to tokenize")->required();
  sub->add_option("--tokenizer", opts->tokenizer,
                  "CLIP merges file (bpe_simple_vocab_16e6.txt.gz), diffusers tokenizer/ folder, or a "
                  "sentencepiece .model (T5)");
  sub->add_option("--pad-id", opts->pad_id, "padding id (default: 49407 for CLIP, the model's pad id for T5)");
  sub->add_option("--max-length", opts->max_length, "sequence length for sentencepiece models (default 77)");
  sub->add_flag_function("-q,--quiet", [&globals](std::int64_t) { globals.verbosity = -1; }, "warnings only");
  sub->add_flag_function("-v,--verbose", [&globals](std::int64_t) { globals.verbosity = 1; }, "debug output");
  sub->callback([&action, opts] {
    action = [opts] {
      const std::string path = find_tokenizer(opts->tokenizer, std::nullopt);
      if (is_spm_model_path(path)) {
        if (opts->max_length < 1 || opts->max_length > 65536) {
          throw UsageError(fmt::format("--max-length {} is out of range 1..65536", opts->max_length));
        }
        SpmTokenizer t = SpmTokenizer::load(path);
        int pad = opts->pad_id.value_or(t.pad_id());
        if (pad < 0 || pad >= t.vocab_size()) {
          throw UsageError(fmt::format("--pad-id {} is out of range 0..{}", pad, t.vocab_size() - 1));
        }
        for (const auto& text : opts->texts) {
          std::cout << nlohmann::json(t.tokenize(text, opts->max_length, pad).ids).dump() << "\n";
        }
        return 0;
      }
      if (opts->max_length != kContext) {
        throw UsageError(fmt::format("--max-length {} is not supported by CLIP tokenizers, expected {}",
                                     opts->max_length, kContext),
                         "--max-length applies to sentencepiece (.model) tokenizers");
      }
      ClipTokenizer t = ClipTokenizer::load(path);
      int pad = opts->pad_id.value_or(kEot);
      if (pad < 0 || pad >= t.vocab_size()) {
        throw UsageError(fmt::format("--pad-id {} is out of range 0..{}", pad, t.vocab_size() - 1),
                         "SD 1.x pads with 49407, SD 2.x and SDXL's second encoder with 0");
      }
      for (const auto& text : opts->texts) {
        const auto p = t.tokenize(text, pad);
        std::cout << nlohmann::json(std::vector<std::int32_t>(p.ids.begin(), p.ids.end())).dump() << "\n";
      }
      return 0;
    };
  });
}

}  // namespace speed::cli
