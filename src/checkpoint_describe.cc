// `inspect` facts: a stable JSON description of a detected checkpoint and its text rendering.
#include <map>

#include <nlohmann/json.hpp>

#include "speed/checkpoint.h"
#include "speed/error.h"

namespace speed {

namespace {

using OJson = nlohmann::ordered_json;

constexpr Dtype kDtypeOrder[] = {Dtype::F64, Dtype::F32, Dtype::BF16, Dtype::F16, Dtype::F8_E4M3, Dtype::F8_E5M2,
                                 Dtype::I64, Dtype::U64, Dtype::I32, Dtype::U32, Dtype::I16, Dtype::U16,
                                 Dtype::I8,  Dtype::U8,  Dtype::BOOL};

OJson dtype_counts(const std::map<Dtype, std::size_t>& counts) {
  OJson j = OJson::object();
  for (Dtype d : kDtypeOrder) {
    auto it = counts.find(d);
    if (it != counts.end()) j[dtype_name(d)] = it->second;
  }
  return j;
}

std::string human_size(std::uint64_t bytes) {
  if (bytes >= (1ull << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30));
  if (bytes >= (1ull << 20)) return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1ull << 20));
  if (bytes >= (1ull << 10)) return fmt::format("{:.1f} KiB", static_cast<double>(bytes) / (1ull << 10));
  return fmt::format("{} B", bytes);
}

OJson opt(const std::optional<std::string>& s) { return s ? OJson(*s) : OJson(nullptr); }

}  // namespace

nlohmann::ordered_json describe_checkpoint(const Checkpoint& ck) {
  OJson j;
  j["path"] = ck.path;
  j["family"] = family_name(ck.family);
  j["layout"] = layout_name(ck.layout);
  std::uint64_t size = 0;
  std::map<Dtype, std::size_t> total;
  OJson files = OJson::array();
  for (const auto& f : ck.files) {
    std::map<Dtype, std::size_t> counts;
    for (const auto& t : f.st->tensors()) {
      ++counts[t.dtype];
      ++total[t.dtype];
    }
    OJson keys = OJson::array();
    for (const auto& kv : f.st->metadata()) keys.push_back(kv.first);
    size += f.st->file_size();
    files.push_back(OJson{{"path", f.path},
                          {"role", f.role},
                          {"size_bytes", f.st->file_size()},
                          {"tensors", f.st->tensors().size()},
                          {"dtypes", dtype_counts(counts)},
                          {"metadata_keys", keys}});
  }
  j["size_bytes"] = size;
  j["dtypes"] = dtype_counts(total);
  j["files"] = files;
  j["unet"] = OJson{{"naming", ck.unet_naming},
                    {"prefix", ck.unet_prefix},
                    {"variant", ck.variant},
                    {"index", opt(ck.unet_index)},
                    {"context_dim", ck.context_dim},
                    {"kv_layers", ck.kv_layers()},
                    {"kv_tensors", ck.kv.size()}};
  j["detection"] = ck.detection;
  OJson tes = OJson::array();
  for (const auto& te : ck.text_encoders) {
    tes.push_back(OJson{{"prefix", te.prefix},
                        {"file", ck.files.at(te.file).path},
                        {"naming", naming_name(te.naming)},
                        {"vocab", te.vocab},
                        {"positions", te.positions},
                        {"width", te.width},
                        {"layers", te.layers},
                        {"heads", te.heads},
                        {"mlp", te.mlp},
                        {"activation", activation_name(te.activation)},
                        {"pad_id", te.pad_id},
                        {"output_layer", te.output_layer},
                        {"final_layer_norm", te.final_layer_norm},
                        {"projection", te.has_projection ? OJson(te.projection_key) : OJson(nullptr)},
                        {"config", opt(te.config_path)},
                        {"tokenizer", opt(te.tokenizer_dir)}});
  }
  j["text_encoders"] = tes;
  j["tokenizer"] = opt(ck.tokenizer_dir);
  std::size_t twins = 0;
  for (const auto& l : ck.kv) twins += l.ema_twin ? 1 : 0;
  j["ema"] = OJson{{"present", ck.has_ema}, {"kv_twins", twins}, {"tensors", ck.ema_tensors}};
  OJson kv = OJson::array();
  for (const auto& l : ck.kv) {
    kv.push_back(OJson{{"name", l.canonical},
                       {"source", l.source},
                       {"file", l.file},
                       {"shape", {l.out, l.in}},
                       {"dtype", dtype_name(l.dtype)},
                       {"ema_twin", opt(l.ema_twin)}});
  }
  j["kv"] = kv;
  return j;
}

std::string describe_checkpoint_text(const Checkpoint& ck) {
  std::string s;
  auto line = [&](const std::string& l) { s += l + "\n"; };
  std::uint64_t size = 0;
  std::map<Dtype, std::size_t> total;
  for (const auto& f : ck.files) {
    size += f.st->file_size();
    for (const auto& t : f.st->tensors()) ++total[t.dtype];
  }
  std::vector<std::string> dts;
  for (Dtype d : kDtypeOrder) {
    if (total.count(d)) dts.push_back(fmt::format("{} {}", dtype_name(d), total[d]));
  }
  line(fmt::format("model:        {}", ck.path));
  line(fmt::format("family:       {}", family_name(ck.family)));
  std::string unet = fmt::format("{} names", ck.unet_naming);
  if (!ck.unet_prefix.empty()) unet += fmt::format(", prefix '{}'", ck.unet_prefix);
  if (!ck.variant.empty()) unet += fmt::format(", variant {}", ck.variant);
  if (ck.unet_index) unet += ", sharded";
  line(fmt::format("layout:       {} (UNet: {})", layout_name(ck.layout), unet));
  line(fmt::format("size:         {} ({} bytes) in {} file(s)", human_size(size), size, ck.files.size()));
  for (const auto& f : ck.files) {
    line(fmt::format("  {:<14} {}  {}, {} tensors", f.role, f.path, human_size(f.st->file_size()),
                     f.st->tensors().size()));
  }
  line(fmt::format("dtypes:       {}", fmt::join(dts, ", ")));
  line(fmt::format("detected by:  {}", fmt::join(ck.detection, "; ")));
  line(fmt::format("context:      {}", ck.context_dim));
  for (std::size_t i = 0; i < ck.text_encoders.size(); ++i) {
    const auto& te = ck.text_encoders[i];
    std::string out = te.output_layer < 0 ? "all layers" : fmt::format("first {} layers", te.output_layer);
    line(fmt::format("text encoder {}: '{}' ({} names) width {}, {} layers, {} heads, mlp {}, {}, vocab {}, {} "
                     "positions; pad {}, output {}{}{}",
                     i, te.prefix, naming_name(te.naming), te.width, te.layers, te.heads, te.mlp,
                     activation_name(te.activation), te.vocab, te.positions, te.pad_id, out,
                     te.final_layer_norm ? " + final LN" : ", no final LN",
                     te.has_projection ? ", has projection" : ""));
  }
  if (ck.text_encoders.empty()) line("text encoder: none in this file");
  if (ck.tokenizer_dir) line(fmt::format("tokenizer:    {}", *ck.tokenizer_dir));
  std::size_t twins = 0;
  for (const auto& l : ck.kv) twins += l.ema_twin ? 1 : 0;
  line(fmt::format("EMA:          {}", ck.has_ema || ck.ema_tensors
                                           ? fmt::format("{} model_ema.* tensors, {} K/V twins", ck.ema_tensors, twins)
                                           : std::string("none")));
  std::vector<std::string> keys;
  for (const auto& kv : ck.files.front().st->metadata()) keys.push_back(kv.first);
  line(fmt::format("metadata:     {}", keys.empty() ? std::string("none") : fmt::format("{}", fmt::join(keys, ", "))));
  line(fmt::format("K/V layers:   {} ({} tensors)", ck.kv_layers(), ck.kv.size()));
  for (const auto& l : ck.kv) {
    std::string src = l.source == l.canonical ? "" : "  <- " + l.source;
    line(fmt::format("  {:<62} [{}, {}] {}{}{}", l.canonical, l.out, l.in, dtype_name(l.dtype), src,
                     l.ema_twin ? "  (+EMA)" : ""));
  }
  return s;
}

}  // namespace speed
