// app: the erase pipeline (options -> checkpoint -> concepts -> embed -> edit -> export -> report).
#include "speed/app.h"

#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "app_internal.h"
#include "speed/atomic_file.h"
#include "speed/embed.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/report.h"
#include "speed/tensor.h"
#include "speed/version.h"

namespace fs = std::filesystem;

namespace speed {

using Json = nlohmann::ordered_json;

namespace detail {

Stopwatch::Stopwatch() : start_(std::chrono::steady_clock::now()) {}
double Stopwatch::seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void write_text_atomic(const std::string& path, const std::string& text) {
  AtomicFile f(path, /*overwrite=*/true);
  f.write(text.data(), text.size());
  f.commit();
}

void check_report_path(const std::string& path, const std::vector<std::string>& taken) {
  if (path == "-") return;
  fs::path p(path);
  std::error_code ec;
  for (const auto& t : taken) {
    if (fs::weakly_canonical(p, ec) == fs::weakly_canonical(t, ec)) {
      throw UsageError(fmt::format("--report '{}' names an input or the output ('{}')", path, t),
                       "choose another report path");
    }
  }
  fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  if (!fs::is_directory(dir, ec)) {
    fail_hint("create it first, or choose another --report path",
              "report folder '{}' does not exist", dir.string());
  }
  SPEED_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0, "report folder '{}' is not writable: {}",
              dir.string(), std::strerror(errno));
  SPEED_CHECK(!fs::is_directory(p, ec), "--report '{}' is a folder, expected a file", path);
}

std::vector<at::Tensor> embed_lists(Embedder& emb, const std::vector<PromptList>& lists,
                                    const std::string& stage, const ProgressFn& progress,
                                    std::int64_t& done, std::int64_t total) {
  // Chunks only for progress (rows do not depend on what they are embedded with); large, since
  // every call runs its own pass over the encoder weights.
  constexpr std::size_t kChunk = 4096;
  std::vector<std::vector<at::Tensor>> parts(lists.size());
  std::size_t li = 0, pos = 0;  // the next prompt: lists[li], index pos
  auto skip_finished = [&] {
    while (li < lists.size() && pos >= lists[li].prompts->size()) ++li, pos = 0;
  };
  skip_finished();
  while (li < lists.size()) {
    std::vector<std::vector<TokenizedPrompt>> tokens;
    std::vector<std::size_t> owner;
    std::size_t n = 0;
    while (li < lists.size() && n < kChunk) {
      const std::vector<std::string>& p = *lists[li].prompts;
      const std::size_t take = std::min(kChunk - n, p.size() - pos);
      const auto first = p.begin() + static_cast<std::ptrdiff_t>(pos);
      const auto last = first + static_cast<std::ptrdiff_t>(take);
      tokens.push_back(emb.tokenize(std::vector<std::string>(first, last)));
      owner.push_back(li);
      n += take, pos += take;
      skip_finished();
    }
    std::vector<Embedder::Request> requests;
    for (std::size_t k = 0; k < tokens.size(); ++k)
      requests.push_back({&tokens[k], lists[owner[k]].all_tokens});
    std::vector<at::Tensor> rows = emb.embed(requests);
    for (std::size_t k = 0; k < rows.size(); ++k) parts[owner[k]].push_back(std::move(rows[k]));
    done += static_cast<std::int64_t>(n);
    if (progress) progress({stage, done, total});
  }
  std::vector<at::Tensor> out;
  for (std::size_t i = 0; i < lists.size(); ++i) {
    if (parts[i].empty()) {
      out.push_back(lists[i].all_tokens ? at::empty({0, kContext, emb.width()})
                                        : at::empty({0, emb.width()}));
    } else {
      out.push_back(parts[i].size() == 1 ? parts[i][0] : at::cat(parts[i], 0));
    }
  }
  return out;
}

}  // namespace detail

using detail::Stopwatch;

constexpr std::uint32_t kDpaDirection = 1;  // Embedder::get_vector kind

std::string resolve_device(const std::string& device) {
  if (device == "cpu") return "cpu";
  if (device == "cuda") {
    if (!at::hasCUDA()) {
      fail_hint("use --device cpu (or auto), or a CUDA build of LibTorch on a machine with a GPU",
                "--device cuda was asked for, but LibTorch sees no CUDA GPU");
    }
    return "cuda";
  }
  if (device == "auto") return at::hasCUDA() ? "cuda" : "cpu";
  throw UsageError(fmt::format("unknown device '{}'", device), "use --device auto, cpu or cuda");
}

void apply_preset(const Preset& p, const std::set<std::string>& given, EraseRequest& r) {
  auto not_given = [&](const char* name) { return given.count(name) == 0; };
  // Targets given on the command line replace the preset's targets as a whole.
  if (not_given("concepts") && not_given("concept")) {
    if (!p.concept_sources.empty()) r.concepts.concept_sources = p.concept_sources;
    if (!p.concept_texts.empty()) r.concepts.concept_texts = p.concept_texts;
  }
  if (not_given("anchor") && p.anchor) r.concepts.anchors = *p.anchor;
  if (not_given("retain") && !p.retain.empty()) r.concepts.retain_sources = p.retain;
  EraseOptions& e = r.edit;
  if (not_given("method") && p.method) e.method = parse_method(*p.method);
  if (not_given("params") && p.params) e.params = parse_params(*p.params);
  auto to_int = [](std::int64_t v, const char* name) {
    if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
      throw UsageError(fmt::format("preset value {} of '{}' is out of range", v, name));
    }
    return static_cast<int>(v);
  };
  if (not_given("augment") && p.augment) e.augment = to_int(*p.augment, "augment");
  if (not_given("iec-clusters") && p.iec_clusters) e.iec_clusters = to_int(*p.iec_clusters, "iec-clusters");
  if (not_given("seed") && p.seed) {
    if (*p.seed < 0) throw UsageError(fmt::format("preset seed {} is negative", *p.seed));
    e.seed = static_cast<std::uint64_t>(*p.seed);
  }
  if (not_given("threshold") && p.threshold) e.threshold = *p.threshold;
  if (not_given("retain-scale") && p.retain_scale) e.retain_scale = *p.retain_scale;
  if (not_given("lambda") && p.lambda) e.lambda = *p.lambda;
  if (not_given("lamb") && p.lamb) e.uce_lamb = *p.lamb;
  if (not_given("erase-scale") && p.erase_scale) e.uce_erase_scale = *p.erase_scale;
  if (not_given("preserve-scale") && p.preserve_scale) e.uce_preserve_scale = *p.preserve_scale;
  if (not_given("no-filter") && p.no_filter) e.ipf = !*p.no_filter;
  if (not_given("no-iec") && p.no_iec) e.no_iec = *p.no_iec;
  if (not_given("all-tokens") && p.all_tokens) e.all_tokens = *p.all_tokens;
  if (not_given("allow-empty-null-space") && p.allow_empty_null_space) {
    e.allow_empty_null_space = *p.allow_empty_null_space;
  }
  r.preset = p.name;
}

RunResult run_erase(const EraseRequest& req) {
  Stopwatch total;
  RunResult res;
  Json timings = Json::object();
  auto stage_done = [&](const std::string& stage, const Stopwatch& sw) {
    double s = sw.seconds();
    res.timings.push_back({stage, s});
    timings[stage] = s;
    return s;
  };

  validate_options(req.edit);
  res.device = resolve_device(req.device);
  // Every core by default (LibTorch alone would start with 1 here); OpenBLAS's pool gets the same
  // size so that the two pools are decided together (docs/performance.md).
  set_compute_threads(req.threads > 0 ? req.threads : available_cores());

  // ---- load ----
  Stopwatch sw;
  Checkpoint ckpt = open_checkpoint(req.model);
  ExportOptions out = req.output;
  for (std::string& f : source_files(req.concepts)) out.inputs.push_back(std::move(f));
  if (req.tokenizer) out.inputs.push_back(*req.tokenizer);
  out.output = prepare_output(ckpt, out);  // before any work: a bad path fails in a second
  if (req.report) {
    std::vector<std::string> taken = out.inputs;
    taken.push_back(req.model);
    taken.push_back(out.output);
    detail::check_report_path(*req.report, taken);
  }
  InputFingerprint fp = fingerprint_checkpoint(ckpt);
  log().info("load: {} {} checkpoint '{}', {} K/V tensors ({:.2f} s)", family_name(ckpt.family),
             layout_name(ckpt.layout), ckpt.path, ckpt.kv.size(), stage_done("load", sw));

  // ---- concepts ----
  sw = Stopwatch();
  ConceptSet set = load_concepts(req.concepts);
  log().info("concepts: {} target(s), {} retain text(s) kept of {} ({} dropped by the target "
             "filter) ({:.2f} s)",
             set.targets.size(), set.retain.size(), set.retain_unique, set.dropped.size(),
             stage_done("concepts", sw));

  // ---- encode ----
  sw = Stopwatch();
  EmbedOptions eo;
  eo.device = res.device;
  if (!req.no_cache) eo.cache_dir = req.cache_dir ? req.cache_dir : default_cache_dir();
  Embedder emb(ckpt, req.tokenizer, eo);
  {
    auto toks = emb.tokenize(set.targets);
    for (std::size_t i = 0; i < toks.size(); ++i) {
      if (toks[i].n <= 2) {  // SOT and EOT only: the tokenizer's clean-up left nothing
        throw UsageError(fmt::format("target concept '{}' has no tokens (only spaces or control "
                                     "characters once cleaned up), so there is nothing to erase",
                                     set.targets[i]),
                         "check the concept list's encoding and contents");
      }
      if (toks[i].truncated) {
        log().warn("concept '{}' is longer than 75 tokens; only its first 75 are used",
                   set.targets[i]);
      }
    }
  }
  EmbeddingSets sets;
  const bool all = req.edit.all_tokens;
  std::int64_t done = 0;
  std::int64_t units = static_cast<std::int64_t>(2 * set.targets.size() + set.retain.size() + 1);
  // Every list in one call (one pass over the encoder weights, SOT and the shared first tokens
  // computed in it too, prompts of the same mode de-duplicated across lists): targets, anchors,
  // retain texts and the empty prompt.
  const std::vector<std::string> empty_prompt{""};
  std::vector<detail::PromptList> lists = {{&set.targets, all}, {&set.anchors, all}};
  if (set.has_retain_source) lists.push_back({&set.retain, false});
  lists.push_back({&empty_prompt, true});
  const std::vector<at::Tensor> embedded =
      detail::embed_lists(emb, lists, "encode", req.progress, done, units);
  // All-tokens mode uses each prompt's rows 1..76 (SPEC §1.2).
  sets.targets = all ? embedded[0].narrow(1, 1, kContext - 1) : embedded[0];
  sets.anchors = all ? embedded[1].narrow(1, 1, kContext - 1) : embedded[1];
  if (set.has_retain_source) sets.retain = embedded[2];
  sets.empty = embedded.back()[0];
  // The encoder is done: what it converted goes before the edit allocates (all its weights on a
  // GPU or in float64, ~0.3 GB for CLIP-L; on the CPU in float32 only the small tensors, the
  // block matrices being widened per layer during the forward), and glibc hands the freed blocks
  // back (they sit in the main thread's arena, which the edit's workers do not use).
  emb.release_weights();
  malloc_trim(0);
  std::int64_t hits = emb.cache_hits(), misses = emb.cache_misses();
  log().info("encode: {} prompt(s), cache {} hit(s) / {} miss(es) ({:.2f} s)", units, hits, misses,
             stage_done("encode", sw));

  // ---- edit ----
  sw = Stopwatch();
  EraseOptions eopt = req.edit;
  eopt.device = res.device;
  std::vector<LayerInput> inputs;
  std::vector<const KVLayer*> edited_layers;
  for (const KVLayer& l : ckpt.kv) {
    if (!params_edit(eopt.params, l.is_key)) continue;
    const auto& st = ckpt.files.at(l.file).st;
    at::Tensor w = tensor_view(st, st->at(l.source));
    // Checked here, in the stored dtype, to name the tensor as the file spells it (what the user
    // can look up): a NaN or Inf in W would spread over the whole edited layer (SPEC §6: refuse,
    // never write a damaged edit).
    if (!all_finite(w)) {
      const auto bad = at::isfinite(w).logical_not().sum().item<std::int64_t>();
      fail_hint("the checkpoint is damaged: re-download or re-convert it",
                "tensor '{}' of '{}' contains non-finite values ({} NaN or Inf of {}); it cannot be "
                "edited",
                l.source, ckpt.files.at(l.file).path, bad, w.numel());
    }
    inputs.push_back({l.canonical, w});
    edited_layers.push_back(&l);
  }
  SPEED_CHECK(!inputs.empty(), "'{}' has no attn2 {} layers to edit", ckpt.path,
              params_name(eopt.params));
  if (req.progress) req.progress({"edit", 0, static_cast<std::int64_t>(inputs.size())});
  // The DPA direction of a weight (its smallest right singular vector, a third of the edit's
  // work) depends on W alone: cached beside the embeddings, keyed by W's bytes, dtype and shape.
  const bool dpa = eopt.method == EditMethod::Speed && eopt.augment > 0;
  std::vector<std::vector<std::int32_t>> dpa_keys;
  std::int64_t dpa_hits = 0;
  if (dpa) {
    for (LayerInput& in : inputs) {
      const at::Tensor& w = in.weight;
      const std::uint64_t h =
          hash64(w.data_ptr(), static_cast<std::size_t>(w.numel() * w.element_size()));
      dpa_keys.push_back({static_cast<std::int32_t>(h & 0xffffffffu), static_cast<std::int32_t>(h >> 32),
                          static_cast<std::int32_t>(w.size(0)), static_cast<std::int32_t>(w.size(1)),
                          static_cast<std::int32_t>(w.scalar_type())});
      at::Tensor v = at::empty({w.size(1)}, at::kDouble);
      if (emb.get_vector(kDpaDirection, dpa_keys.back(), v.numel(), v.data_ptr<double>())) {
        in.dpa_direction = v;
        ++dpa_hits;
      }
    }
  }
  EditResult edit = edit_layers(sets, inputs, eopt);
  if (dpa) {
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const at::Tensor& v = edit.layers[i].dpa_direction;
      if (!inputs[i].dpa_direction.defined() && v.defined()) {
        emb.put_vector(kDpaDirection, dpa_keys[i], v.numel(), v.data_ptr<double>());
      }
    }
    log().debug("edit: DPA directions, {} of {} from the cache", dpa_hits, inputs.size());
  }
  if (req.progress) {
    req.progress({"edit", static_cast<std::int64_t>(inputs.size()), static_cast<std::int64_t>(inputs.size())});
  }
  EditedWeights weights;
  const bool lora = out.format == OutputFormat::Lora;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    LayerResult& lr = edit.layers.at(i);
    // LoRA needs ΔW exactly (float64 W'); the other formats store W' in the tensor's dtype.
    at::Tensor& w = weights[inputs[i].name];
    w = lora ? inputs[i].weight.to(at::kDouble) + lr.delta.to(at::kCPU)
             : apply_delta(inputs[i].weight, lr.delta.to(at::kCPU));
    // Finite W and ΔW can still overflow the stored dtype (fp16 weights near 65504): refused
    // rather than written as Inf.
    SPEED_CHECK(all_finite(w), "the edited weight '{}' does not fit its dtype {} (|W + ΔW| up to {:.4g})",
                inputs[i].name, c10::toString(w.scalar_type()),
                (inputs[i].weight.to(at::kDouble) + lr.delta.to(at::kCPU)).abs().max().item<double>());
    lr.delta = at::Tensor();  // free as we go (SDXL: 140 float64 deltas)
  }
  inputs.clear();
  res.layers_edited = static_cast<int>(edit.layers.size());
  Json layers = Json::array();
  double sum_t = 0, sum_r = 0;
  res.null_dim_min = std::numeric_limits<std::int64_t>::max();
  for (std::size_t i = 0; i < edit.layers.size(); ++i) {
    const LayerDiagnostics& d = edit.layers[i].diag;
    layers.push_back(layer_json(d, edited_layers[i]->source));
    res.null_dim_min = std::min(res.null_dim_min, d.null_dim);
    res.null_dim_max = std::max(res.null_dim_max, d.null_dim);
    res.rel_dw_max = std::max(res.rel_dw_max, d.rel_dw);
    res.iec_residual_max = std::max(res.iec_residual_max, d.iec_residual);
    sum_t += d.target_residual_mean;
    sum_r += d.retain_residual_mean;
  }
  res.target_residual_mean = sum_t / static_cast<double>(edit.layers.size());
  res.retain_residual_mean = sum_r / static_cast<double>(edit.layers.size());
  log().info("edit: {} layer(s), null space {}..{} dims, max |dW|/|W| {:.3g}, max IEC residual "
             "{:.2g} ({:.2f} s)",
             res.layers_edited, res.null_dim_min, res.null_dim_max, res.rel_dw_max,
             res.iec_residual_max, stage_done("edit", sw));

  // ---- report (embedded part) ----
  Json report;
  report["tool"] = Json{{"name", "speed-erase"}, {"version", kVersion}};
  report["input"] = input_json(ckpt, fp);
  report["input"]["text_encoder_hash"] = emb.weights_hash();
  if (req.preset) report["preset"] = *req.preset;
  report["options"] = options_json(eopt);
  report["concepts"] = concepts_json(set, req.concepts.retain_sources);
  report["device"] = res.device;
  report["threads"] = at::get_num_threads();
  // libgomp's idle-thread policy and glibc's tunables, as this process read them, and the page
  // fault cost the launcher timed to choose malloc's page size (src/launch/main.cc).
  report["omp_wait_policy"] = env_or_null("OMP_WAIT_POLICY");
  report["glibc_tunables"] = env_or_null("GLIBC_TUNABLES");
  report["page_fault_us"] = number_env_or_null("SPEED_ERASE_PAGE_FAULT_US");
  // The kernels OpenBLAS runs: the same inputs give other bytes with other kernels.
  const std::string core = blas_core();
  report["blas_core"] = core.empty() ? Json(nullptr) : Json(core);
  Json ej;
  ej["retain_rows"] = edit.retain_rows;
  ej["retain_is_empty_prompt"] = edit.retain_is_empty_prompt;
  ej["k2_columns"] = edit.k2.defined() ? edit.k2.size(1) : 0;
  if (!edit.kmeans.sizes.empty()) {
    ej["kmeans"] = Json{{"sizes", edit.kmeans.sizes}, {"iterations", edit.kmeans.iterations}};
  }
  if (!edit.notes.empty()) ej["notes"] = edit.notes;
  report["edit"] = ej;
  report["summary"] = Json{{"layers_edited", res.layers_edited},
                           {"null_dim_min", res.null_dim_min},
                           {"null_dim_max", res.null_dim_max},
                           {"rel_dw_max", number_or_null(res.rel_dw_max)},
                           {"iec_residual_max", number_or_null(res.iec_residual_max)},
                           {"target_residual_mean", number_or_null(res.target_residual_mean)},
                           {"retain_residual_mean", number_or_null(res.retain_residual_mean)}};
  report["layers"] = layers;

  // ---- export ----
  sw = Stopwatch();
  out.report_json = embedded_report(report);
  out.extra_metadata.emplace_back("speed_erase.version", kVersion);
  // Staged: written and fsynced under temp names, renamed into place only as the run's last step
  // (after the report), so that a failure anywhere leaves an existing output (--force) as it was.
  StagedExport staged = stage_export(ckpt, weights, out);
  res.output = staged.result();
  log().info("export: {} output '{}', {:.1f} MB ({:.2f} s)", format_name(out.format),
             res.output.path, static_cast<double>(res.output.bytes) / 1e6, stage_done("export", sw));

  Json oj;
  oj["format"] = format_name(out.format);
  oj["path"] = res.output.path;
  oj["bytes"] = res.output.bytes;
  oj["written"] = res.output.written;
  if (!res.output.copied.empty()) oj["copied"] = res.output.copied.size();
  if (res.output.ema_edited) oj["ema_edited"] = res.output.ema_edited;
  if (res.output.ema_dropped) oj["ema_dropped"] = res.output.ema_dropped;
  if (lora) {
    Json ranks = Json::array();
    for (const auto& l : res.output.lora) {
      ranks.push_back(Json{{"module", l.module}, {"rank", l.rank}, {"rel_error", l.rel_error}});
    }
    oj["lora"] = ranks;
  }
  report["output"] = oj;
  report["cache"] = Json{{"enabled", eo.cache_dir.has_value()},
                         {"dir", eo.cache_dir ? Json(*eo.cache_dir) : Json(nullptr)},
                         {"hits", hits},
                         {"misses", misses}};
  timings["total"] = total.seconds();
  report["timings"] = timings;
  res.report = report;
  res.report_text = report.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
  std::unique_ptr<AtomicFile> report_file;
  if (req.report && *req.report != "-") {
    report_file = std::make_unique<AtomicFile>(*req.report, /*overwrite=*/true);
    report_file->write(res.report_text.data(), res.report_text.size());
    report_file->finish();
  }
  // Every byte is on disk now; only renames remain. The report goes first and the output last:
  // should the output's rename still fail, the report of a run without output is taken back.
  if (report_file) report_file->publish();
  try {
    staged.commit();
  } catch (...) {
    std::error_code ec;
    if (report_file) fs::remove(*req.report, ec);
    throw;
  }
  return res;
}

}  // namespace speed
