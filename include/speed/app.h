// speed/app.h: the erase pipeline (options -> checkpoint -> concepts -> embeddings -> edit ->
// export -> report) and the embedding-space evaluation (`eval`), as library calls.
//
// The library never prints: progress goes through the request's callback (the CLI draws a bar
// on a TTY) and the stage log lines through speed::log().
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "speed/concepts.h"
#include "speed/erase.h"
#include "speed/export.h"

namespace speed {

// One progress step of a long stage ("encode", "edit"): done out of total units.
struct ProgressEvent {
  std::string stage;
  std::int64_t done = 0;
  std::int64_t total = 0;
};
using ProgressFn = std::function<void(const ProgressEvent&)>;

// Everything `speed-erase erase` takes (SPEC §3), already merged with the preset.
struct EraseRequest {
  std::string model;
  ConceptInputs concepts;                // --concepts/--concept/--anchor/--retain/--data-dir
  EraseOptions edit;                     // method, params, augment, τ, s, λ, IPF, IEC, seed, ...
  std::string device = "auto";           // auto | cpu | cuda
  std::optional<std::string> tokenizer;  // --tokenizer
  ExportOptions output;                  // --output, --format, --force, --drop-ema
  std::optional<std::string> report;     // --report PATH or "-" (stdout: the CLI prints it)
  int threads = 0;                       // --threads (0: every core, see available_cores())
  bool no_cache = false;                 // --no-cache
  std::optional<std::string> cache_dir;  // --cache-dir (default: embed.h default_cache_dir())
  std::optional<std::string> preset;     // for the report: the preset's name
  ProgressFn progress;                   // may be empty
};

struct StageTime {
  std::string stage;
  double seconds = 0;
};

struct RunResult {
  nlohmann::ordered_json report;  // the full report (with timings and output)
  std::string report_text;        // report.dump(2) + "\n": what --report writes
  ExportResult output;
  std::vector<StageTime> timings;
  std::string device;             // "cpu" or "cuda"
  int layers_edited = 0;
  std::int64_t null_dim_min = 0, null_dim_max = 0;
  double rel_dw_max = 0, iec_residual_max = 0;
  double target_residual_mean = 0, retain_residual_mean = 0;  // averaged over layers
};

// Runs the whole pipeline. Validates the output path before any work. Throws speed::Error.
RunResult run_erase(const EraseRequest& request);

// Preset merge (SPEC §3): every field of `preset` is applied unless its long option name (e.g.
// "threshold", "concept", "no-filter") is in `given`.
void apply_preset(const Preset& preset, const std::set<std::string>& given, EraseRequest& request);

// "auto" -> "cuda" when LibTorch sees a GPU, else "cpu"; "cuda" without one -> error with hint.
std::string resolve_device(const std::string& device);

// ---- eval (SPEC §4): embedding-space metrics of an edit ----

struct EvalRequest {
  std::string model;                     // the original checkpoint
  std::optional<std::string> edited;     // --edited: a `full` or `edited` safetensors output
  std::optional<std::string> lora;       // --lora: a kohya LoRA (ours or any kohya file)
  ConceptInputs concepts;                // --concepts FILE, --anchor
  std::vector<std::string> prompts;      // --prompts FILE[:COLUMN]...
  int max_prompts = 0;                   // --max-prompts: first N of each prompt set (0: all)
  std::optional<std::string> tokenizer;
  std::string device = "auto";
  std::optional<std::string> cache_dir;
  std::optional<std::string> report;
  ProgressFn progress;
};

struct EvalResult {
  nlohmann::ordered_json report;
  std::string report_text;
};

// Loads W (model) and W' (edited file, or W + scale·up·down from the LoRA) for every K/V layer
// that differs, embeds the targets/anchors (last-subject rows) and each prompt set (all 77 rows
// per prompt, as SD uses them) and reports per layer and averaged:
//   target_residual   ‖W' e_i − W e*_i‖ / ‖W e_i − W e*_i‖, mean over targets
//   preservation      ‖ΔW h‖ / ‖W h‖ over the rows h of a prompt set (mean, max)
EvalResult run_eval(const EvalRequest& request);

}  // namespace speed
