// app: the report JSON (SPEC §4) and the input fingerprint.
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "speed/report.h"
#include "speed/tensor.h"
#include "speed/version.h"

namespace speed {

using Json = nlohmann::ordered_json;

InputFingerprint fingerprint_checkpoint(const Checkpoint& ckpt) {
  InputFingerprint fp;
  std::uint64_t h = hash64("speed-erase input v1", 20);
  for (const auto& f : ckpt.files) {
    fp.total_bytes += f.st->file_size();
    h = hash_combine(h, f.st->file_size());
    std::string_view header = f.st->header_json();
    h = hash_combine(h, hash64(header.data(), header.size()));
  }
  for (const auto& l : ckpt.kv) {
    const SafeTensors& st = ckpt.file(l.file);
    const TensorInfo& t = st.at(l.source);
    h = hash_combine(h, hash64(st.data(t), t.nbytes()));
  }
  fp.xxh64 = hex64(h);
  return fp;
}

Json number_or_null(double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); }

Json env_or_null(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? Json(value) : Json(nullptr);
}

Json number_env_or_null(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return Json(nullptr);
  char* end = nullptr;
  const double v = std::strtod(value, &end);
  return *end == '\0' && std::isfinite(v) ? Json(v) : Json(nullptr);
}

Json input_json(const Checkpoint& ckpt, const InputFingerprint& fp) {
  Json j;
  j["path"] = ckpt.path;
  j["size"] = fp.total_bytes;
  j["files"] = ckpt.files.size();
  j["hash"] = Json{{"algorithm", "xxh64"},
                   {"covers", "each file's size and header, then the stored K/V tensor bytes"},
                   {"value", fp.xxh64}};
  j["family"] = family_name(ckpt.family);
  j["layout"] = layout_name(ckpt.layout);
  j["context_dim"] = ckpt.context_dim;
  j["kv_tensors"] = ckpt.kv.size();
  if (!ckpt.kv.empty()) j["kv_dtype"] = dtype_name(ckpt.kv.front().dtype);
  j["ema"] = ckpt.has_ema;
  if (!ckpt.variant.empty()) j["variant"] = ckpt.variant;
  return j;
}

Json options_json(const EraseOptions& o) {
  Json j;
  j["method"] = method_name(o.method);
  j["params"] = params_name(o.params);
  if (o.method == EditMethod::Speed) {
    j["augment"] = o.augment;
    j["threshold"] = o.threshold;
    j["retain-scale"] = o.retain_scale;
    j["lambda"] = o.lambda;
    j["filter"] = o.ipf;
    j["iec-clusters"] = o.iec_clusters;
    j["iec"] = !o.no_iec;
    j["allow-empty-null-space"] = o.allow_empty_null_space;
  } else {
    j["lamb"] = o.uce_lamb;
    j["erase-scale"] = o.uce_erase_scale;
    j["preserve-scale"] = o.uce_preserve_scale;
  }
  j["all-tokens"] = o.all_tokens;
  j["seed"] = o.seed;
  return j;
}

Json concepts_json(const ConceptSet& set, const std::vector<std::string>& retain_sources) {
  Json j;
  j["targets"] = set.targets;
  j["anchors"] = set.anchors;
  j["target_count"] = set.targets.size();
  Json r;
  r["sources"] = retain_sources;
  r["empty_prompt"] = !set.has_retain_source;
  r["texts"] = set.retain_total;
  r["unique"] = set.retain_unique;
  r["kept"] = set.retain.size();
  r["dropped"] = set.dropped.size();
  r["dropped_texts"] = set.dropped;
  j["retain"] = r;
  if (!set.notes.empty()) j["notes"] = set.notes;
  return j;
}

Json layer_json(const LayerDiagnostics& d, const std::string& source) {
  Json j;
  j["name"] = d.name;
  j["source"] = source;
  j["shape"] = {d.out, d.in};
  j["retain_rows"] = d.retain_rows;
  j["kept_rows"] = d.kept_rows;
  j["augmented_rows"] = d.augmented_rows;
  j["rows_used"] = d.rows_used;
  j["null_dim"] = d.null_dim;
  j["eig_below_threshold"] = number_or_null(d.eig_below);
  j["eig_above_threshold"] = number_or_null(d.eig_above);
  j["w_fro"] = number_or_null(d.w_fro);
  j["dw_fro"] = number_or_null(d.dw_fro);
  j["rel_dw"] = number_or_null(d.rel_dw);
  j["iec_residual"] = number_or_null(d.iec_residual);
  j["target_residual_mean"] = number_or_null(d.target_residual_mean);
  j["retain_residual_mean"] = number_or_null(d.retain_residual_mean);
  j["retain_residual_max"] = number_or_null(d.retain_residual_max);
  return j;
}

const std::vector<std::string>& volatile_report_keys() {
  static const std::vector<std::string> keys = {"timings",         "cache",
                                                "output",          "threads",
                                                "omp_wait_policy", "glibc_tunables",
                                                "page_fault_us",   "blas_core"};
  return keys;
}

std::string embedded_report(const Json& full) {
  Json j = full;
  for (const auto& k : volatile_report_keys()) j.erase(k);
  // ensure_ascii off: metadata values are UTF-8 strings; invalid bytes cannot occur here
  // because every text went through the UTF-8-validating concept readers.
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace speed
