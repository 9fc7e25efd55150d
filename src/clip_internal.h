// Internal to the clip module: the torch::nn tree shared by clip.cc (forward) and clip_load.cc.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "speed/clip.h"

namespace speed::clip_detail {

// A leaf holding "weight" and optionally "bias" (parameters, never trained).
struct Params : torch::nn::Module {
  at::Tensor weight, bias;
  Params(const at::Tensor& w, const at::Tensor& b) {
    weight = register_parameter("weight", w, /*requires_grad=*/false);
    if (b.defined()) bias = register_parameter("bias", b, /*requires_grad=*/false);
  }
};

// q/k/v are registered as row views of one fused [3W, W] tensor: one GEMM instead of three,
// while named_parameters() still shows the HF names.
// With per-layer widening (TextEncoder::Impl::widen), in_w is undefined and in_src holds the
// stored q, k, v rows (one [3W, W] tensor or three [W, W]) that forward() widens into a buffer.
struct Attention : torch::nn::Module {
  at::Tensor in_w, in_b;  // fused q, k, v
  std::vector<at::Tensor> in_src;
  std::shared_ptr<Params> q_proj, k_proj, v_proj, out_proj;
};

struct Mlp : torch::nn::Module {
  std::shared_ptr<Params> fc1, fc2;
};

struct Block : torch::nn::Module {
  std::shared_ptr<Attention> self_attn;
  std::shared_ptr<Params> layer_norm1, layer_norm2;
  std::shared_ptr<Mlp> mlp;
};

struct Embeddings : torch::nn::Module {
  std::shared_ptr<Params> token_embedding;     // stored dtype (a view over the mapping)
  std::shared_ptr<Params> position_embedding;  // compute dtype
};

struct Layers : torch::nn::Module {
  std::vector<std::shared_ptr<Block>> blocks;
};

struct Encoder : torch::nn::Module {
  std::shared_ptr<Layers> layers;
};

struct ClipText : torch::nn::Module {
  std::shared_ptr<Embeddings> embeddings;
  std::shared_ptr<Encoder> encoder;
  std::shared_ptr<Params> final_layer_norm;  // null when not applied
};

// One used tensor's stored bytes, for the weights hash (kept alive by the owner).
struct HashItem {
  std::string name;
  int dtype;
  std::vector<std::int64_t> shape;
  const std::uint8_t* bytes;
  std::size_t nbytes;
};

}  // namespace speed::clip_detail

namespace speed {

struct TextEncoder::Impl {
  TextEncoderInfo info;
  TextEncoderOptions options;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  int layers_run = 0;
  std::int64_t heads = 0;
  // CPU float32 forward: the four weight matrices of each block stay in their stored dtype (views
  // over the mapping) and are widened per layer into one reused buffer during the forward. A
  // fresh float32 copy of CLIP-L's ~85M block weights is ~340 MB of new memory, and new memory
  // costs the kernel more than the conversion (docs/performance.md, "Seventh session").
  bool widen = false;
  std::shared_ptr<clip_detail::ClipText> model;
  std::shared_ptr<const SafeTensors> file;    // keeps mapped views alive
  std::vector<at::Tensor> stored;             // keeps in-memory sources alive (from_tensors)
  std::vector<clip_detail::HashItem> hash_items;
  mutable std::uint64_t hash = 0;
  mutable bool hashed = false;
};

}  // namespace speed
