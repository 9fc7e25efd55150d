// app: `eval`, embedding-space metrics of an edit (SPEC §4) for the targets and prompt sets.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include <ATen/ATen.h>

#include "app_internal.h"
#include "speed/app.h"
#include "speed/embed.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/report.h"
#include "speed/tensor.h"
#include "speed/version.h"

namespace fs = std::filesystem;

namespace speed {

using Json = nlohmann::ordered_json;

namespace {

struct EvalLayer {
  const KVLayer* layer = nullptr;
  at::Tensor w, dw;  // [out, d] float64
};

at::Tensor read_f64(const std::shared_ptr<const SafeTensors>& st, const TensorInfo& t) {
  return load_tensor(st, t, at::kDouble).clone();
}

// The edited weights of a `full` (file or folder) or `edited` output, matched by canonical name.
std::vector<EvalLayer> deltas_from_edited(const Checkpoint& base, const std::string& path) {
  std::vector<EvalLayer> out;
  std::error_code ec;
  std::optional<Checkpoint> folder;
  std::shared_ptr<const SafeTensors> file;
  if (fs::is_directory(path, ec)) {
    folder = open_checkpoint(path);
  } else {
    file = std::make_shared<SafeTensors>(SafeTensors::open(path));
  }
  for (const KVLayer& l : base.kv) {
    const auto& bst = base.files.at(l.file).st;
    std::shared_ptr<const SafeTensors> est;
    const TensorInfo* t = nullptr;
    if (folder) {
      for (const KVLayer& e : folder->kv) {
        if (e.canonical == l.canonical) {
          est = folder->files.at(e.file).st;
          t = est->find(e.source);
        }
      }
    } else {
      est = file;
      t = file->find(l.canonical);
      if (t == nullptr) t = file->find(l.source);
    }
    if (t == nullptr) continue;
    SPEED_CHECK(t->shape == std::vector<std::int64_t>({l.out, l.in}),
                "tensor '{}' of '{}' has shape {}, expected [{}, {}]", t->name, path,
                format_shape(t->shape), l.out, l.in);
    EvalLayer el{&l, read_f64(bst, bst->at(l.source)), {}};
    el.dw = read_f64(est, *t) - el.w;
    out.push_back(std::move(el));
  }
  SPEED_CHECK(!out.empty(), "'{}' holds none of the K/V layers of '{}'", path, base.path);
  return out;
}

// ΔW = (alpha / r) · up · down of a kohya LoRA (alpha missing or 0: scale 1).
std::vector<EvalLayer> deltas_from_lora(const Checkpoint& base, const std::string& path) {
  auto st = std::make_shared<SafeTensors>(SafeTensors::open(path));
  std::vector<EvalLayer> out;
  std::size_t used = 0;
  for (const KVLayer& l : base.kv) {
    std::vector<std::string> names = {lora_module_name(base.family, l.canonical)};
    // The other spelling (LDM path for SD1/SD2, diffusers path for SDXL) is common too.
    names.push_back(lora_module_name(base.family == Family::SDXL ? Family::SD1 : Family::SDXL,
                                     l.canonical));
    for (const auto& m : names) {
      const TensorInfo* up = st->find(m + ".lora_up.weight");
      const TensorInfo* down = st->find(m + ".lora_down.weight");
      if (up == nullptr || down == nullptr) continue;
      SPEED_CHECK(up->shape.size() == 2 && down->shape.size() == 2 && up->shape[0] == l.out &&
                      down->shape[1] == l.in && up->shape[1] == down->shape[0],
                  "LoRA module '{}' of '{}' has up {} and down {}, expected [{}, r] and [r, {}]", m,
                  path, format_shape(up->shape), format_shape(down->shape), l.out, l.in);
      double r = static_cast<double>(down->shape[0]);
      double scale = 1.0;
      if (const TensorInfo* a = st->find(m + ".alpha")) {
        SPEED_CHECK(a->numel() == 1, "LoRA alpha '{}' of '{}' has {} values, expected 1", a->name,
                    path, a->numel());
        double alpha = read_f64(st, *a).item<double>();
        if (alpha != 0 && r > 0) scale = alpha / r;
      }
      const auto& bst = base.files.at(l.file).st;
      EvalLayer el{&l, read_f64(bst, bst->at(l.source)), {}};
      el.dw = scale * at::matmul(read_f64(st, *up), read_f64(st, *down));
      out.push_back(std::move(el));
      used += 2;
      break;
    }
  }
  SPEED_CHECK(!out.empty(), "LoRA '{}' has no module for the K/V layers of '{}'", path, base.path);
  if (used * 3 / 2 < st->tensors().size()) {
    log().warn("LoRA '{}' also modifies layers other than attn2 K/V; eval ignores them", path);
  }
  return out;
}

// Per-layer running statistics of ‖ΔW h‖ / ‖W h‖ over rows h.
struct RatioStats {
  std::vector<double> sum, max;
  std::int64_t rows = 0;
  explicit RatioStats(std::size_t n) : sum(n, 0.0), max(n, 0.0) {}
  void add(const std::vector<EvalLayer>& layers, const at::Tensor& h /* [n, d] f64 */) {
    for (std::size_t i = 0; i < layers.size(); ++i) {
      at::Tensor num = at::matmul(h, layers[i].dw.t()).norm(2, {1});
      at::Tensor den = at::matmul(h, layers[i].w.t()).norm(2, {1});
      at::Tensor ratio = num / den;
      sum[i] += ratio.sum().item<double>();
      max[i] = std::max(max[i], ratio.max().item<double>());
    }
    rows += h.size(0);
  }
};

}  // namespace

EvalResult run_eval(const EvalRequest& req) {
  SPEED_CHECK(req.edited.has_value() != req.lora.has_value(),
              "eval needs exactly one of --edited and --lora");
  detail::Stopwatch total;
  const std::string edit_path = req.edited ? *req.edited : *req.lora;
  std::string device = resolve_device(req.device);
  Checkpoint ckpt = open_checkpoint(req.model);
  if (req.report) {
    std::vector<std::string> taken = source_files(req.concepts);
    for (const auto& spec : req.prompts) taken.push_back(source_file(spec));
    if (req.tokenizer) taken.push_back(*req.tokenizer);
    taken.push_back(req.model);
    taken.push_back(edit_path);
    detail::check_report_path(*req.report, taken);
  }
  std::vector<EvalLayer> all = req.edited ? deltas_from_edited(ckpt, *req.edited)
                                          : deltas_from_lora(ckpt, *req.lora);
  std::vector<EvalLayer> layers;
  for (auto& l : all) {
    SPEED_CHECK(all_finite(l.dw), "the edit of '{}' in '{}' is not finite (NaN or Inf in the {})",
                l.layer->canonical, edit_path, req.edited ? "weight" : "LoRA factors or alpha");
    if (l.dw.abs().max().item<double>() > 0) layers.push_back(std::move(l));
  }
  SPEED_CHECK(!layers.empty(), "'{}' does not change any K/V layer of '{}'",
              edit_path, ckpt.path);
  log().info("eval: {} edited layer(s) of '{}'", layers.size(), ckpt.path);

  ConceptSet set = load_concepts(req.concepts);
  EmbedOptions eo;
  eo.device = device;
  eo.cache_dir = req.cache_dir;
  Embedder emb(ckpt, req.tokenizer, eo);
  std::int64_t done = 0;
  auto n_t = static_cast<std::int64_t>(set.targets.size());
  const std::vector<at::Tensor> rows = detail::embed_lists(
      emb, {{&set.targets, false}, {&set.anchors, false}}, "targets", req.progress, done, 2 * n_t);
  at::Tensor e = rows[0].to(at::kDouble);
  at::Tensor es = rows[1].to(at::kDouble);

  Json jl = Json::array();
  std::vector<double> target_res(layers.size(), 0.0);
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const EvalLayer& l = layers[i];
    at::Tensor we = at::matmul(e, l.w.t()), wes = at::matmul(es, l.w.t());
    at::Tensor num = (we + at::matmul(e, l.dw.t()) - wes).norm(2, {1});
    at::Tensor den = (we - wes).norm(2, {1});
    // Targets whose row already maps onto the anchor's have no residual to speak of.
    at::Tensor ok = den > 0;
    std::int64_t n_ok = ok.sum().item<std::int64_t>();
    target_res[i] = n_ok > 0 ? (num.masked_select(ok) / den.masked_select(ok)).mean().item<double>()
                             : std::numeric_limits<double>::quiet_NaN();
  }

  Json sets_json = Json::array();
  std::vector<RatioStats> stats;
  for (const auto& spec : req.prompts) {
    std::vector<ConceptEntry> entries = read_source(spec, req.concepts.data_dir);
    std::vector<std::string> prompts;
    for (auto& en : entries) prompts.push_back(std::move(en.text));
    if (req.max_prompts > 0 && prompts.size() > static_cast<std::size_t>(req.max_prompts)) {
      prompts.resize(static_cast<std::size_t>(req.max_prompts));
    }
    SPEED_CHECK(!prompts.empty(), "prompt source '{}' has no prompts", spec);
    RatioStats st(layers.size());
    // All 77 rows of every prompt, as the UNet's cross-attention sees them, in chunks so that
    // memory does not grow with the prompt count.
    constexpr std::size_t kChunk = 128;
    std::int64_t pdone = 0;
    for (std::size_t i = 0; i < prompts.size(); i += kChunk) {
      std::vector<std::string> chunk(prompts.begin() + static_cast<std::ptrdiff_t>(i),
                                     prompts.begin() + static_cast<std::ptrdiff_t>(std::min(prompts.size(), i + kChunk)));
      at::Tensor h = emb.all_tokens(chunk).to(at::kDouble);
      st.add(layers, h.reshape({-1, h.size(2)}));
      pdone += static_cast<std::int64_t>(chunk.size());
      if (req.progress) req.progress({"prompts", pdone, static_cast<std::int64_t>(prompts.size())});
    }
    sets_json.push_back(Json{{"source", spec}, {"prompts", prompts.size()}, {"rows", st.rows}});
    log().info("eval: prompt set '{}': {} prompt(s), {} row(s)", spec, prompts.size(), st.rows);
    stats.push_back(std::move(st));
  }

  double t_sum = 0;
  std::int64_t t_n = 0;
  std::vector<double> p_mean(stats.size(), 0.0), p_max(stats.size(), 0.0);
  for (std::size_t i = 0; i < layers.size(); ++i) {
    Json j;
    j["name"] = layers[i].layer->canonical;
    j["shape"] = {layers[i].layer->out, layers[i].layer->in};
    j["rel_dw"] = layers[i].dw.norm().item<double>() / layers[i].w.norm().item<double>();
    j["target_residual"] = number_or_null(target_res[i]);
    if (std::isfinite(target_res[i])) {
      t_sum += target_res[i];
      ++t_n;
    }
    Json pj = Json::array();
    for (std::size_t s = 0; s < stats.size(); ++s) {
      double mean = stats[s].sum[i] / static_cast<double>(stats[s].rows);
      pj.push_back(Json{{"source", req.prompts[s]}, {"mean", number_or_null(mean)},
                        {"max", number_or_null(stats[s].max[i])}});
      p_mean[s] += mean / static_cast<double>(layers.size());
      p_max[s] = std::max(p_max[s], stats[s].max[i]);
    }
    j["preservation"] = pj;
    jl.push_back(j);
  }
  Json summary;
  summary["layers"] = layers.size();
  summary["target_residual_mean"] =
      number_or_null(t_n > 0 ? t_sum / static_cast<double>(t_n) : std::numeric_limits<double>::quiet_NaN());
  Json ps = Json::array();
  for (std::size_t s = 0; s < stats.size(); ++s) {
    ps.push_back(Json{{"source", req.prompts[s]}, {"mean", number_or_null(p_mean[s])},
                      {"max", number_or_null(p_max[s])}});
  }
  summary["preservation"] = ps;

  Json report;
  report["tool"] = Json{{"name", "speed-erase"}, {"version", kVersion}, {"command", "eval"}};
  report["input"] = input_json(ckpt, fingerprint_checkpoint(ckpt));
  report["edit"] = Json{{"kind", req.edited ? "edited" : "lora"},
                        {"path", edit_path},
                        {"layers", layers.size()}};
  report["device"] = device;
  report["definitions"] = Json{
      {"target_residual", "mean over targets of |W' e_i - W e*_i| / |W e_i - W e*_i| (last-subject rows)"},
      {"preservation", "|dW h| / |W h| over all 77 token rows h of every prompt (mean, max)"}};
  report["targets"] = set.targets;
  report["anchors"] = set.anchors;
  report["prompt_sets"] = sets_json;
  report["summary"] = summary;
  report["layers"] = jl;
  report["timings"] = Json{{"total", total.seconds()}};
  EvalResult res;
  res.report = report;
  res.report_text = report.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
  if (req.report && *req.report != "-") detail::write_text_atomic(*req.report, res.report_text);
  return res;
}

}  // namespace speed
