// `speed-erase eval`: embedding-space erasure/preservation metrics of an edit (SPEC §3, §4).
#include <cmath>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cmd_erase_progress.h"
#include "commands.h"
#include "speed/app.h"
#include "speed/embed.h"
#include "speed/error.h"

namespace speed::cli {

namespace {

struct EvalArgs {
  std::string model, edited, lora, tokenizer, report, device = "auto", cache_dir, data_dir;
  std::vector<std::string> concepts, concept_texts, anchors, prompts;
  int max_prompts = 0;
  bool no_cache = false;
};

}  // namespace

SPEED_CLI_COMMAND(eval) {
  auto* sub = app.add_subcommand("eval", "embedding-space erasure/preservation metrics of an edit");
  static auto args = std::make_shared<EvalArgs>();
  EvalArgs& a = *args;
  sub->add_option("--model", a.model, "the original checkpoint")->required();
  auto* ed = sub->add_option("--edited", a.edited, "an edited model (--format full or edited output)");
  auto* lo = sub->add_option("--lora", a.lora, "a kohya LoRA (--format lora output)");
  ed->excludes(lo);
  sub->add_option("--concepts", a.concepts, "the erased concepts: file or FILE.csv:COLUMN");
  sub->add_option("--concept", a.concept_texts, "an erased concept (repeatable)");
  sub->add_option("--anchor", a.anchors, "the anchor(s) used for the edit (default \"\")");
  sub->add_option("--prompts", a.prompts, "prompt set: FILE or FILE.csv:COLUMN (repeatable)");
  sub->add_option("--max-prompts", a.max_prompts, "use the first N prompts of each set (0: all)")
      ->check(CLI::Range(0, 2147483647));
  sub->add_option("--tokenizer", a.tokenizer, "CLIP merges file or diffusers tokenizer/ folder");
  sub->add_option("--device", a.device, "auto (default), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  sub->add_option("--report", a.report, "write the JSON report to PATH, or '-' for stdout");
  sub->add_flag("--no-cache", a.no_cache, "do not read or write the embedding cache");
  sub->add_option("--cache-dir", a.cache_dir, "embedding cache folder");
  sub->add_option("--data-dir", a.data_dir, "folder holding the data files named by the sources");
  sub->add_flag_callback("-q,--quiet", [&globals] { globals.verbosity = -1; }, "warnings and errors only");
  sub->add_flag_callback("-v,--verbose", [&globals] { globals.verbosity = 1; }, "debug output");

  sub->callback([&action, &globals] {
    action = [&globals] {
      EvalArgs& a = *args;
      if (a.edited.empty() == a.lora.empty()) {
        throw UsageError("eval needs --edited PATH or --lora PATH", "pass the output of an erase run");
      }
      if (a.concepts.empty() && a.concept_texts.empty()) {
        throw UsageError("eval needs the erased concepts", "pass --concepts FILE or --concept TEXT");
      }
      EvalRequest r;
      r.model = a.model;
      if (!a.edited.empty()) r.edited = a.edited;
      if (!a.lora.empty()) r.lora = a.lora;
      r.concepts.concept_sources = a.concepts;
      r.concepts.concept_texts = a.concept_texts;
      r.concepts.anchors = a.anchors;
      if (!a.data_dir.empty()) r.concepts.data_dir = a.data_dir;
      r.prompts = a.prompts;
      r.max_prompts = a.max_prompts;
      if (!a.tokenizer.empty()) r.tokenizer = a.tokenizer;
      r.device = a.device;
      if (!a.no_cache) r.cache_dir = a.cache_dir.empty() ? default_cache_dir() : a.cache_dir;
      if (!a.report.empty()) r.report = a.report;
      Progress bar(globals.verbosity >= 0);
      r.progress = [&bar](const ProgressEvent& ev) { bar.update(ev); };
      EvalResult res = run_eval(r);
      bar.finish();
      if (a.report == "-") std::cout << res.report_text << std::flush;
      if (globals.verbosity >= 0) {
        const auto& s = res.report["summary"];
        auto num = [](const nlohmann::ordered_json& j) {
          return j.is_number() ? j.get<double>() : std::nan("");
        };
        std::cerr << fmt::format("eval: {} layer(s), target residual {:.4g} (mean over layers)\n",
                                 s["layers"].get<std::size_t>(),
                                 num(s["target_residual_mean"]));
        for (const auto& p : s["preservation"]) {
          std::cerr << fmt::format("  preservation '{}': |dW h|/|W h| mean {:.4g}, max {:.4g}\n",
                                   p["source"].get<std::string>(), num(p["mean"]), num(p["max"]));
        }
      }
      return 0;
    };
  });
}

}  // namespace speed::cli
