// Strict loading of a CLIP text encoder (HF or OpenCLIP naming) into the canonical module tree.
#include <map>

#include <ATen/core/grad_mode.h>

#include "clip_internal.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/tensor.h"

namespace speed {
namespace {

using namespace clip_detail;

// A tensor under the encoder's prefix: in a file (info) or in memory (mem).
struct Src {
  const TensorInfo* info = nullptr;
  at::Tensor mem;
  std::string full;  // the name as the user's file spells it
  bool used = false;
};

// Parses "<head><digits>." at the start of `rel`; -1 if `rel` does not start that way.
long layer_of(const std::string& rel, const std::string& head) {
  if (rel.compare(0, head.size(), head) != 0) return -1;
  std::size_t i = head.size();
  long v = 0;
  std::size_t digits = 0;
  while (i < rel.size() && rel[i] >= '0' && rel[i] <= '9' && digits < 9) {
    v = v * 10 + (rel[i] - '0');
    ++i;
    ++digits;
  }
  if (digits == 0 || i >= rel.size() || rel[i] != '.') return -1;
  return v;
}

class Loader {
 public:
  Loader(std::map<std::string, Src>& sources, const std::shared_ptr<const SafeTensors>& file,
         TextEncoder::Impl& impl, std::string where)
      : sources_(sources), file_(file), impl_(impl), where_(std::move(where)) {}

  // The stored tensor (stored dtype, CPU, zero-copy where possible) after the shape check.
  at::Tensor take(const std::string& rel, std::vector<std::int64_t> expected) {
    auto it = sources_.find(rel);
    if (it == sources_.end()) {
      throw Error(fmt::format("text encoder tensor '{}{}' is missing from {}", impl_.info.prefix,
                              rel, where_),
                  "the file's text encoder is incomplete or is not a CLIP text model");
    }
    Src& s = it->second;
    const std::vector<std::int64_t> got =
        s.info ? s.info->shape : std::vector<std::int64_t>(s.mem.sizes().begin(), s.mem.sizes().end());
    SPEED_CHECK(got == expected, "text encoder tensor '{}' has shape {}, expected {}", s.full,
                shape_string(got), shape_string(expected));
    at::Tensor t = s.info ? tensor_view(file_, *s.info) : s.mem;
    SPEED_CHECK(at::isFloatingType(t.scalar_type()),
                "text encoder tensor '{}' has dtype {}, expected a floating-point dtype", s.full,
                t.scalar_type());
    s.used = true;
    impl_.stored.push_back(t);  // the hash reads these bytes later
    impl_.hash_items.push_back({rel, static_cast<int>(t.scalar_type()), got,
                                static_cast<const std::uint8_t*>(t.data_ptr()),
                                static_cast<std::size_t>(t.numel() * t.element_size())});
    return t;
  }

  // The tensor in the compute dtype on the compute device (the view itself when it already is).
  at::Tensor compute(const std::string& rel, std::vector<std::int64_t> expected) {
    at::Tensor t = take(rel, std::move(expected));
    return impl_.options.weights ? t.to(impl_.device, impl_.dtype) : t;
  }
  // A block's weight matrix: stored as it is when the forward widens it per layer.
  at::Tensor matrix(const std::string& rel, std::vector<std::int64_t> expected) {
    return impl_.widen ? take(rel, std::move(expected)) : compute(rel, std::move(expected));
  }

  // Every tensor under the prefix must have been used or be one that SD ignores.
  template <typename Allowed>
  void check_unused(Allowed allowed) {
    std::vector<std::string> unused;
    for (const auto& [rel, s] : sources_) {
      if (!s.used && !allowed(rel)) unused.push_back(s.full);
    }
    if (unused.empty()) return;
    std::string more = unused.size() > 1 ? fmt::format(" (and {} more)", unused.size() - 1) : "";
    throw Error(fmt::format("unexpected tensor '{}' under the text encoder prefix '{}' in {}{}",
                            unused.front(), impl_.info.prefix, where_, more),
                "the text encoder has more layers or other modules than its detected configuration");
  }

 private:
  std::map<std::string, Src>& sources_;
  std::shared_ptr<const SafeTensors> file_;
  TextEncoder::Impl& impl_;
  std::string where_;
};

std::shared_ptr<Params> leaf(torch::nn::Module& parent, const std::string& name,
                             const at::Tensor& w, const at::Tensor& b) {
  return parent.register_module(name, std::make_shared<Params>(w, b));
}

void validate_config(const TextEncoderInfo& c, int layers_run) {
  SPEED_CHECK(c.width > 0 && c.width <= 65536 && c.heads > 0 && c.width % c.heads == 0,
              "text encoder width {} is not a positive multiple of its {} heads", c.width, c.heads);
  SPEED_CHECK(c.layers > 0 && c.layers <= 1024, "text encoder has {} layers, expected 1..1024",
              c.layers);
  SPEED_CHECK(layers_run >= 1 && layers_run <= c.layers,
              "text encoder output layer {} is outside 1..{}", c.output_layer, c.layers);
  SPEED_CHECK(c.positions >= 1 && c.positions <= 65536 && c.vocab >= 1 && c.mlp >= 1,
              "text encoder geometry is invalid (vocab {}, positions {}, mlp {})", c.vocab,
              c.positions, c.mlp);
}

std::unique_ptr<TextEncoder::Impl> build(std::map<std::string, Src>& sources,
                                         const std::shared_ptr<const SafeTensors>& file,
                                         const TextEncoderInfo& info, TextEncoderOptions options,
                                         const std::string& where) {
  at::NoGradGuard guard;  // plain tensors (not inference tensors): callers may use them freely
  auto impl = std::make_unique<TextEncoder::Impl>();
  impl->info = info;
  impl->options = options;
  impl->file = file;
  SPEED_CHECK(options.dtype == at::kFloat || options.dtype == at::kDouble,
              "text encoder compute dtype must be float32 or float64, got {}", options.dtype);
  impl->dtype = options.dtype;
  impl->device = at::Device(options.device);
  exact_float32_matmul(impl->device);
  impl->layers_run = info.output_layer < 0 ? static_cast<int>(info.layers) : info.output_layer;
  validate_config(info, impl->layers_run);
  impl->heads = info.heads;
  impl->widen = options.weights && impl->device.is_cpu() && impl->dtype == at::kFloat;

  const std::int64_t W = info.width, M = info.mlp;
  const bool hf = info.naming == TextNaming::HF;
  Loader L(sources, file, *impl, where);
  auto m = std::make_shared<ClipText>();
  auto& model = *m;
  model.embeddings = model.register_module("embeddings", std::make_shared<Embeddings>());
  model.encoder = model.register_module("encoder", std::make_shared<Encoder>());
  model.encoder->layers = model.encoder->register_module("layers", std::make_shared<Layers>());

  // The token table stays in its stored dtype: only the gathered rows are widened.
  at::Tensor tok = L.take(hf ? "embeddings.token_embedding.weight" : "token_embedding.weight",
                          {info.vocab, W});
  if (options.weights) tok = tok.to(impl->device);
  model.embeddings->token_embedding = leaf(*model.embeddings, "token_embedding", tok, {});
  model.embeddings->position_embedding =
      leaf(*model.embeddings, "position_embedding",
           L.compute(hf ? "embeddings.position_embedding.weight" : "positional_embedding",
                     {info.positions, W}),
           {});

  const auto opts = at::TensorOptions().dtype(impl->dtype).device(impl->device);
  for (int i = 0; i < impl->layers_run; ++i) {
    const std::string p = hf ? fmt::format("encoder.layers.{}.", i)
                             : fmt::format("transformer.resblocks.{}.", i);
    auto blk = std::make_shared<Block>();
    auto attn = std::make_shared<Attention>();
    if (hf && !options.weights) {
      for (const char* name : {"q_proj", "k_proj", "v_proj"}) {  // checked and hashed, not fused
        L.take(p + "self_attn." + name + ".weight", {W, W});
        L.take(p + "self_attn." + name + ".bias", {W});
      }
      // Placeholders with the right shapes (expanded views: no memory), never read.
      attn->in_w = at::zeros({1, 1}, at::TensorOptions().dtype(impl->dtype)).expand({3 * W, W});
      attn->in_b = at::zeros({1}, at::TensorOptions().dtype(impl->dtype)).expand({3 * W});
    } else if (hf) {
      if (!impl->widen) attn->in_w = at::empty({3 * W, W}, opts);
      attn->in_b = at::empty({3 * W}, opts);
      const char* names[3] = {"q_proj", "k_proj", "v_proj"};
      for (int j = 0; j < 3; ++j) {
        at::Tensor w = L.take(p + "self_attn." + names[j] + ".weight", {W, W});
        if (impl->widen) {
          attn->in_src.push_back(w);
        } else {
          attn->in_w.narrow(0, j * W, W).copy_(w);
        }
        attn->in_b.narrow(0, j * W, W).copy_(L.take(p + "self_attn." + names[j] + ".bias", {W}));
      }
    } else {
      at::Tensor w = L.matrix(p + "attn.in_proj_weight", {3 * W, W});
      if (impl->widen) {
        attn->in_src.push_back(w);
      } else {
        attn->in_w = w.contiguous();
      }
      attn->in_b = L.compute(p + "attn.in_proj_bias", {3 * W}).contiguous();
    }
    // The leaves show the stored q, k, v rows when the forward widens them per layer.
    auto rows = [&](int j) {
      if (!impl->widen) return attn->in_w.narrow(0, j * W, W);
      return attn->in_src.size() == 3 ? attn->in_src[j] : attn->in_src[0].narrow(0, j * W, W);
    };
    attn->q_proj = leaf(*attn, "q_proj", rows(0), attn->in_b.narrow(0, 0, W));
    attn->k_proj = leaf(*attn, "k_proj", rows(1), attn->in_b.narrow(0, W, W));
    attn->v_proj = leaf(*attn, "v_proj", rows(2), attn->in_b.narrow(0, 2 * W, W));
    const std::string op = p + (hf ? "self_attn.out_proj." : "attn.out_proj.");
    attn->out_proj = leaf(*attn, "out_proj", L.matrix(op + "weight", {W, W}), L.compute(op + "bias", {W}));
    blk->self_attn = blk->register_module("self_attn", attn);
    const std::string ln1 = p + (hf ? "layer_norm1." : "ln_1.");
    const std::string ln2 = p + (hf ? "layer_norm2." : "ln_2.");
    blk->layer_norm1 =
        leaf(*blk, "layer_norm1", L.compute(ln1 + "weight", {W}), L.compute(ln1 + "bias", {W}));
    auto mlp = std::make_shared<Mlp>();
    const std::string f1 = p + (hf ? "mlp.fc1." : "mlp.c_fc.");
    const std::string f2 = p + (hf ? "mlp.fc2." : "mlp.c_proj.");
    mlp->fc1 = leaf(*mlp, "fc1", L.matrix(f1 + "weight", {M, W}), L.compute(f1 + "bias", {M}));
    mlp->fc2 = leaf(*mlp, "fc2", L.matrix(f2 + "weight", {W, M}), L.compute(f2 + "bias", {W}));
    blk->mlp = blk->register_module("mlp", mlp);
    blk->layer_norm2 =
        leaf(*blk, "layer_norm2", L.compute(ln2 + "weight", {W}), L.compute(ln2 + "bias", {W}));
    model.encoder->layers->blocks.push_back(
        model.encoder->layers->register_module(std::to_string(i), blk));
  }
  const std::string fln = hf ? "final_layer_norm." : "ln_final.";
  if (info.final_layer_norm) {
    model.final_layer_norm = leaf(model, "final_layer_norm", L.compute(fln + "weight", {W}),
                                  L.compute(fln + "bias", {W}));
  }

  const std::string layer_head = hf ? "encoder.layers." : "transformer.resblocks.";
  L.check_unused([&](const std::string& rel) {
    if (hf && (rel == "embeddings.position_ids" || rel == "text_projection.weight")) return true;
    if (!hf && (rel == "text_projection" || rel == "attn_mask")) return true;
    if (rel == "logit_scale") return true;
    if (!info.final_layer_norm && rel.compare(0, fln.size(), fln) == 0) return true;
    const long layer = layer_of(rel, layer_head);
    return layer >= impl->layers_run && layer < info.layers;
  });
  impl->model = std::move(m);
  log().debug("text encoder '{}' {}: width {}, {} of {} layers, {} heads, {}, {}", info.prefix,
              options.weights ? "loaded" : "checked (weights not converted yet)", W, impl->layers_run, info.layers, info.heads,
              info.activation == Activation::QuickGELU ? "quick_gelu" : "gelu",
              info.final_layer_norm ? "final LN" : "no final LN");
  return impl;
}

}  // namespace

std::unique_ptr<TextEncoder> TextEncoder::load(std::shared_ptr<const SafeTensors> st,
                                               const TextEncoderInfo& info,
                                               TextEncoderOptions options) {
  SPEED_CHECK(st != nullptr, "text encoder '{}' has no file", info.prefix);
  std::map<std::string, Src> sources;
  for (const TensorInfo& t : st->tensors()) {
    if (t.name.compare(0, info.prefix.size(), info.prefix) != 0) continue;
    Src s;
    s.info = &t;
    s.full = t.name;
    sources.emplace(t.name.substr(info.prefix.size()), std::move(s));
  }
  const std::string where = fmt::format("'{}'", st->path());
  return std::unique_ptr<TextEncoder>(
      new TextEncoder(build(sources, st, info, std::move(options), where)));
}

std::unique_ptr<TextEncoder> TextEncoder::load(const Checkpoint& ckpt, std::size_t index,
                                               TextEncoderOptions options) {
  SPEED_CHECK(index < ckpt.text_encoders.size(), "'{}' has {} text encoders, asked for number {}",
              ckpt.path, ckpt.text_encoders.size(), index);
  const TextEncoderInfo& info = ckpt.text_encoders[index];
  SPEED_CHECK(info.file < ckpt.files.size(), "text encoder {} of '{}' names file {} of {}", index,
              ckpt.path, info.file, ckpt.files.size());
  return load(ckpt.files[info.file].st, info, std::move(options));
}

std::unique_ptr<TextEncoder> TextEncoder::from_tensors(
    const std::map<std::string, at::Tensor>& named, const TextEncoderInfo& info,
    TextEncoderOptions options) {
  std::map<std::string, Src> sources;
  for (const auto& [name, t] : named) {
    SPEED_CHECK(t.defined(), "tensor '{}' is undefined", name);
    Src s;
    s.mem = t.to(at::kCPU).contiguous();
    s.full = info.prefix + name;
    sources.emplace(name, std::move(s));
  }
  auto impl = build(sources, nullptr, info, std::move(options), "the given tensors");
  return std::unique_ptr<TextEncoder>(new TextEncoder(std::move(impl)));
}

}  // namespace speed
