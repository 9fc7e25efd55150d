// export: the `edited`, `pt` and `lora` formats, LoRA factorisation and dtype casts.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <set>

#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include "export_internal.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/tensor.h"

namespace fs = std::filesystem;

namespace speed {
namespace detail {

namespace {

// The reference writer's tensor order: element size descending, then name (formats.md §1.2).
void sort_tensors(std::vector<TensorData>& tensors) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorData& a, const TensorData& b) {
    std::size_t sa = dtype_size(a.dtype), sb = dtype_size(b.dtype);
    return sa != sb ? sa > sb : a.name < b.name;
  });
}

std::vector<std::int64_t> shape_of(const at::Tensor& t) {
  return std::vector<std::int64_t>(t.sizes().begin(), t.sizes().end());
}

const char* base_model_version(Family f) {
  switch (f) {
    case Family::SD1: return "sd_v1";
    case Family::SD2: return "sd_v2";
    case Family::SDXL: return "sdxl_base_v1-0";
  }
  return "";
}

std::string architecture(const Checkpoint& ckpt) {
  for (const auto& file : ckpt.files) {
    for (const auto& [k, v] : file.st->metadata()) {
      if (k == "modelspec.architecture" && !v.empty() && v.find("/lora") == std::string::npos) {
        return v + "/lora";
      }
    }
  }
  switch (ckpt.family) {
    case Family::SD1: return "stable-diffusion-v1/lora";
    case Family::SD2: return "stable-diffusion-v2-512/lora";
    case Family::SDXL: return "stable-diffusion-xl-v1-base/lora";
  }
  return "";
}

}  // namespace

void export_dict(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                 const fs::path& out, ExportResult& result, Staging& staging) {
  std::vector<at::Tensor> keep;
  std::vector<TensorData> tensors;
  c10::Dict<std::string, at::Tensor> dict;
  for (const KVLayer& layer : ckpt.kv) {
    auto it = edited.find(layer.canonical);
    if (it == edited.end()) continue;
    // The stored dtype of the source: `edited` then matches `full` bit for bit.
    at::Tensor t = to_stored_dtype(it->second, layer.dtype);
    keep.push_back(t);
    tensors.push_back(TensorData{layer.canonical, layer.dtype, shape_of(t), t.data_ptr(),
                                 static_cast<std::size_t>(t.nbytes())});
    dict.insert(layer.canonical, t);
  }
  if (options.format == OutputFormat::Edited) {
    sort_tensors(tensors);
    AtomicFile& f = staging.output(out.string(), options.force);
    write_safetensors(f, tensors, output_metadata(options));
    f.finish();
    result.written.push_back(out.string());
    result.bytes += f.size();
    return;
  }
  // A .pt has no metadata map, and a non-tensor entry would break load_state_dict: the report
  // goes to a sidecar file. Both are staged and renamed together at the end of the run (the
  // sidecar first), so a failed run (e.g. disk full) leaves neither file behind.
  std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
  AtomicFile& pt = staging.output(out.string(), options.force);
  pt.write(bytes.data(), bytes.size());
  pt.finish();
  result.written.push_back(out.string());
  result.bytes += pt.size();
  if (!options.report_json.empty()) {
    fs::path sidecar = out.string() + ".report.json";
    AtomicFile& side = staging.sidecar(sidecar.string(), options.force);
    side.write(options.report_json.data(), options.report_json.size());
    side.write("\n", 1);
    side.finish();
    result.written.push_back(sidecar.string());
    result.bytes += side.size();
  }
}

void export_lora(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                 const fs::path& out, ExportResult& result, Staging& staging) {
  std::vector<at::Tensor> keep;
  std::vector<TensorData> tensors;
  std::int64_t max_rank = 0;
  std::set<std::int64_t> ranks;
  for (const KVLayer& layer : ckpt.kv) {
    auto it = edited.find(layer.canonical);
    if (it == edited.end()) continue;
    const auto& st = ckpt.files.at(layer.file).st;
    at::Tensor w = load_tensor(st, st->at(layer.source), at::kDouble);
    at::Tensor delta = it->second.to(at::kCPU).to(at::kDouble) - w;
    LoraFactors f = lora_factors(delta, options.lora_rank_rtol, it->second.scalar_type());
    LoraLayerInfo info{lora_module_name(ckpt.family, layer.canonical), f.rank, 0.0};
    if (f.rank > 0) {
      at::Tensor up = f.up.to(at::kFloat).contiguous();
      at::Tensor down = f.down.to(at::kFloat).contiguous();
      SPEED_CHECK(all_finite(up) && all_finite(down),
                  "the LoRA factors of '{}' overflow float32 (|ΔW| up to {:.4g})", layer.canonical,
                  delta.abs().max().item<double>());
      at::Tensor alpha = at::full({}, static_cast<double>(f.rank), at::kFloat);
      double dn = delta.norm().item<double>();
      info.rel_error =
          (at::matmul(up.to(at::kDouble), down.to(at::kDouble)) - delta).norm().item<double>() /
          dn;
      for (auto& [suffix, t] : {std::pair<const char*, at::Tensor>{".lora_up.weight", up},
                                {".lora_down.weight", down},
                                {".alpha", alpha}}) {
        keep.push_back(t);
        tensors.push_back(TensorData{info.module + suffix, Dtype::F32, shape_of(t), t.data_ptr(),
                                     static_cast<std::size_t>(t.nbytes())});
      }
      max_rank = std::max(max_rank, f.rank);
      ranks.insert(f.rank);
    } else {
      log().warn("layer '{}' is unchanged by the edit; the LoRA has no module for it",
                 layer.canonical);
    }
    result.lora.push_back(info);
  }
  sort_tensors(tensors);
  // kohya writes "Dynamic" when module ranks differ (networks/resize_lora.py).
  std::string dim = ranks.size() > 1 ? "Dynamic" : std::to_string(max_rank);
  Metadata md;
  md.emplace_back("format", "pt");
  md.emplace_back("ss_network_module", "networks.lora");
  md.emplace_back("ss_network_dim", dim);
  md.emplace_back("ss_network_alpha", dim);
  md.emplace_back("ss_base_model_version", base_model_version(ckpt.family));
  md.emplace_back("ss_v2", ckpt.family == Family::SD2 ? "True" : "False");
  md.emplace_back("modelspec.sai_model_spec", "1.0.0");
  md.emplace_back("modelspec.architecture", architecture(ckpt));
  // Which UNet implementation the key names follow (kohya's library/sai_model_spec.py).
  md.emplace_back("modelspec.implementation", ckpt.family == Family::SDXL
                                                  ? "https://github.com/Stability-AI/generative-models"
                                                  : "diffusers");
  md.emplace_back("modelspec.title", fs::path(out).stem().string());
  for (const auto& kv : output_metadata(options)) {
    if (kv.first != "format") md.push_back(kv);
  }
  AtomicFile& f = staging.output(out.string(), options.force);
  write_safetensors(f, tensors, md);
  f.finish();
  result.written.push_back(out.string());
  result.bytes += f.size();
}

}  // namespace detail

at::Tensor to_stored_dtype(const at::Tensor& w, Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
    case Dtype::F32:
    case Dtype::F16:
    case Dtype::BF16:
      break;
    default:
      fail("cannot store an edited weight as {}; expected F64, F32, F16 or BF16",
           dtype_name(dtype));
  }
  // Tensor.to() rounds to nearest even, the same as PyTorch's own cast.
  return w.to(at::kCPU).to(to_scalar_type(dtype)).contiguous();
}

std::string lora_module_name(Family family, const std::string& canonical) {
  std::string path = canonical;
  const std::string weight = ".weight";
  if (path.size() > weight.size() && path.compare(path.size() - weight.size(), weight.size(), weight) == 0) {
    path.resize(path.size() - weight.size());
  }
  if (family == Family::SDXL) {
    auto pos = path.find(".transformer_blocks.");
    SPEED_CHECK(pos != std::string::npos, "layer '{}' is not inside a transformer block", canonical);
    auto ldm = diffusers_to_ldm_block(path.substr(0, pos));
    SPEED_CHECK(ldm.has_value(), "layer '{}' has no LDM block name", canonical);
    path = *ldm + path.substr(pos);
  }
  std::replace(path.begin(), path.end(), '.', '_');
  return "lora_unet_" + path;
}

LoraFactors lora_factors(const at::Tensor& delta, double rtol, at::ScalarType precision) {
  // Shapes: delta [out, in] -> up [out, r], down [r, in].
  SPEED_CHECK(delta.dim() == 2, "a LoRA delta must be 2-D, got {} dimensions", delta.dim());
  at::Tensor d = delta.to(at::kCPU).to(at::kDouble);
  SPEED_CHECK(at::isfinite(d).all().item<bool>(), "the edit has non-finite values; no LoRA written");
  auto [u, s, vh] = at::linalg_svd(d, false);
  LoraFactors f;
  double smax = s.numel() > 0 ? s[0].item<double>() : 0.0;
  if (rtol <= 0) {
    // The resolution W' was given in: its rounding noise must not count as rank.
    double eps = precision == at::kDouble  ? std::numeric_limits<double>::epsilon()
                 : precision == at::kFloat ? std::numeric_limits<float>::epsilon()
                 : precision == at::kHalf  ? std::ldexp(1.0, -10)
                                           : std::ldexp(1.0, -7);
    rtol = static_cast<double>(std::max(d.size(0), d.size(1))) * eps;
  }
  if (smax > 0 && std::isfinite(smax)) {
    f.rank = (s > rtol * smax).sum().item<std::int64_t>();
  }
  f.up = u.narrow(1, 0, f.rank) * s.narrow(0, 0, f.rank).unsqueeze(0);
  f.down = vh.narrow(0, 0, f.rank).contiguous();
  return f;
}

}  // namespace speed
