// `speed-erase [erase]`: every option of SPEC §3 plus the baselines' and run-control options.
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <iostream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "commands.h"
#include "cmd_erase_progress.h"
#include "speed/app.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/safetensors.h"

namespace speed::cli {

namespace {

struct EraseArgs {
  std::string model;
  std::vector<std::string> concepts, concept_texts, anchors, retain;
  std::string preset, method = "speed", params = "v";
  int augment = 10, iec_clusters = 3, threads = 0;
  double threshold = 0.1, retain_scale = 1.0, lambda = 0.0;
  double lamb = 0.5, erase_scale = 1.0, preserve_scale = 1.0;
  bool no_filter = false, no_iec = false, all_tokens = false, force = false, drop_ema = false;
  bool allow_empty = false, no_cache = false;
  std::uint64_t seed = 0;
  std::string device = "auto", tokenizer, output, format = "full", report, cache_dir, data_dir;
  std::vector<CLI::Option*> tracked;  // options whose presence decides preset precedence
};

std::string long_name(const CLI::Option* o) {
  std::string n = o->get_name(false, true);  // "--threshold"
  while (!n.empty() && n.front() == '-') n.erase(n.begin());
  return n;
}

void print_summary(const RunResult& r) {
  std::string timings;
  for (const auto& t : r.timings) timings += fmt::format("{} {:.2f} s, ", t.stage, t.seconds);
  timings += fmt::format("total {:.2f} s", r.report["timings"].value("total", 0.0));
  const auto& c = r.report["concepts"];
  std::cerr << fmt::format(
      "erased {} concept(s) in {} layer(s) on {}: null space {}..{} dims, max |dW|/|W| {:.3g}, "
      "max IEC residual {:.2g}\n"
      "residuals (mean over layers): target {:.3g}, retain {:.3g}\n"
      "timings: {}\n"
      "output: {} ({}, {:.1f} MB)\n",
      c["target_count"].get<std::size_t>(), r.layers_edited, r.device, r.null_dim_min,
      r.null_dim_max, r.rel_dw_max, r.iec_residual_max, r.target_residual_mean,
      r.retain_residual_mean, timings, r.output.path, r.report["output"]["format"].get<std::string>(),
      static_cast<double>(r.output.bytes) / 1e6);
}

}  // namespace

SPEED_CLI_COMMAND(erase) {
  auto* sub = app.add_subcommand("erase", "erase concepts from a checkpoint (the default command)");
  static auto args = std::make_shared<EraseArgs>();
  EraseArgs& a = *args;
  auto track = [&](CLI::Option* o) {
    a.tracked.push_back(o);
    return o;
  };
  sub->add_option("--model", a.model, "checkpoint: .safetensors file or diffusers folder")->required();
  track(sub->add_option("--concepts", a.concepts, "concept file, or FILE.csv:COLUMN[:KEY=VALUE]"));
  track(sub->add_option("--concept", a.concept_texts, "a concept to erase (repeatable)"));
  track(sub->add_option("--anchor", a.anchors, "what the concepts become: one for all or one per target (default \"\")"));
  track(sub->add_option("--retain", a.retain, "texts to preserve: FILE or FILE.csv:COLUMN (repeatable)"));
  sub->add_option("--preset", a.preset, "paper preset: instance, style, celebrity, nudity, or a JSON file");
  track(sub->add_option("--method", a.method, "speed (default) or uce")->check(CLI::IsMember({"speed", "uce"})));
  track(sub->add_option("--params", a.params, "edited projections: v (default), k or kv")
            ->check(CLI::IsMember({"v", "k", "kv"})));
  track(sub->add_option("--augment", a.augment, "DPA draws per retain row (0: no DPA; default 10)"));
  track(sub->add_option("--threshold", a.threshold, "null-space eigenvalue threshold tau (default 0.1)"));
  track(sub->add_option("--retain-scale", a.retain_scale, "retain scale s (default 1)"));
  track(sub->add_option("--lambda", a.lambda, "IEC softness lambda (default 0: hard constraints)"));
  track(sub->add_flag("--no-filter", a.no_filter, "no influence-based prior filtering (IPF)"));
  track(sub->add_option("--iec-clusters", a.iec_clusters, "k-means centres of the empty prompt in K2 (default 3)"));
  track(sub->add_flag("--no-iec", a.no_iec, "no invariant equality constraints"));
  track(sub->add_flag("--all-tokens", a.all_tokens, "targets and anchors use all 76 token rows (implicit concepts)"));
  // CLI11 reads "-1" into an unsigned as 2^64 - 1 and saturates what is too large: the digits are
  // checked first.
  const CLI::Validator uint64_digits(
      [](std::string& s) {
        std::uint64_t v = 0;
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (s.empty() || ec != std::errc() || end != s.data() + s.size())
          return "is '" + s + "', expected an integer 0..18446744073709551615";
        return std::string();
      },
      "UINT64");
  track(sub->add_option("--seed", a.seed, "seed of the shuffle and DPA noise (default 0)")
            ->check(uint64_digits));
  track(sub->add_option("--lamb", a.lamb, "UCE: lambda (default 0.5)"));
  track(sub->add_option("--erase-scale", a.erase_scale, "UCE: erase scale (default 1)"));
  track(sub->add_option("--preserve-scale", a.preserve_scale, "UCE: preserve scale (default 1)"));
  track(sub->add_flag("--allow-empty-null-space", a.allow_empty, "leave a layer unedited instead of failing when no eigenvalue is below tau"));
  sub->add_option("--device", a.device, "auto (default), cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  sub->add_option("--threads", a.threads, "CPU threads (default: every core this process may use)")->check(CLI::Range(0, 1024));
  sub->add_option("--tokenizer", a.tokenizer, "CLIP merges file or diffusers tokenizer/ folder");
  sub->add_option("--output", a.output, "output path (default: <model>.speed-erase.<ext> beside the model)");
  sub->add_option("--format", a.format, "full (default), edited, pt or lora")
      ->check(CLI::IsMember({"full", "edited", "pt", "lora"}));
  sub->add_option("--report", a.report, "write the JSON report to PATH, or '-' for stdout");
  sub->add_flag("--force", a.force, "replace an existing output");
  sub->add_flag("--drop-ema", a.drop_ema, "full: leave the EMA copy (model_ema.*) out instead of editing it");
  sub->add_flag("--no-cache", a.no_cache, "do not read or write the embedding cache");
  sub->add_option("--cache-dir", a.cache_dir, "embedding cache folder (default ~/.cache/speed-erase)");
  sub->add_option("--data-dir", a.data_dir, "folder holding the preset data files (e.g. instance.csv)");
  sub->add_flag_callback("-q,--quiet", [&globals] { globals.verbosity = -1; }, "warnings and errors only");
  sub->add_flag_callback("-v,--verbose", [&globals] { globals.verbosity = 1; }, "debug output");

  sub->callback([&action, &globals] {
    action = [&globals] {
      EraseArgs& a = *args;
      EraseRequest r;
      r.model = a.model;
      r.concepts.concept_sources = a.concepts;
      r.concepts.concept_texts = a.concept_texts;
      r.concepts.anchors = a.anchors;
      r.concepts.retain_sources = a.retain;
      if (!a.data_dir.empty()) r.concepts.data_dir = a.data_dir;
      EraseOptions& e = r.edit;
      e.method = parse_method(a.method);
      e.params = parse_params(a.params);
      e.augment = a.augment;
      e.threshold = a.threshold;
      e.retain_scale = a.retain_scale;
      e.lambda = a.lambda;
      e.ipf = !a.no_filter;
      e.iec_clusters = a.iec_clusters;
      e.no_iec = a.no_iec;
      e.all_tokens = a.all_tokens;
      e.seed = a.seed;
      e.allow_empty_null_space = a.allow_empty;
      e.uce_lamb = a.lamb;
      e.uce_erase_scale = a.erase_scale;
      e.uce_preserve_scale = a.preserve_scale;
      e.threads = a.threads;
      if (!a.preset.empty()) {
        std::set<std::string> given;
        for (const CLI::Option* o : a.tracked) {
          if (o->count() > 0) given.insert(long_name(o));
        }
        apply_preset(load_preset(a.preset), given, r);
      }
      r.device = a.device;
      r.threads = a.threads;
      if (!a.tokenizer.empty()) r.tokenizer = a.tokenizer;
      r.output.format = parse_format(a.format);
      r.output.output = a.output;
      if (!a.preset.empty()) r.output.inputs.push_back(a.preset);  // when it names a file
      r.output.force = a.force;
      r.output.drop_ema = a.drop_ema;
      if (!a.report.empty()) r.report = a.report;
      r.no_cache = a.no_cache;
      if (!a.cache_dir.empty()) r.cache_dir = a.cache_dir;
      Progress bar(globals.verbosity >= 0);
      r.progress = [&bar](const ProgressEvent& ev) { bar.update(ev); };
      RunResult res = run_erase(r);
      bar.finish();
      if (a.report == "-") std::cout << res.report_text << std::flush;
      if (globals.verbosity >= 0) print_summary(res);
      return 0;
    };
  });
}

}  // namespace speed::cli
