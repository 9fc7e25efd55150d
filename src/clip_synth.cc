// A seeded synthetic CLIP text encoder with real shapes, for benchmarks and tests.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "speed/clip.h"
#include "speed/error.h"
#include "speed/tensor.h"

namespace speed {

void write_synthetic_text_encoder(const std::string& path, const TextEncoderInfo& info,
                                  Dtype dtype, std::uint64_t seed, bool overwrite) {
  SPEED_CHECK(info.naming == TextNaming::HF, "synthetic text encoders use HF naming only");
  const auto type = to_scalar_type(dtype);
  SPEED_CHECK(at::isFloatingType(type), "synthetic weights need a floating dtype, got {}",
              dtype_name(dtype));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const std::int64_t W = info.width, M = info.mlp;
  std::vector<TensorBytes> held;
  // Generation order is part of the seed's meaning: keep it fixed.
  auto normal = [&](const std::string& name, std::vector<std::int64_t> shape, double stdev) {
    at::Tensor t = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)).mul_(stdev);
    held.push_back(tensor_bytes(info.prefix + name, t.to(type)));
  };
  auto constant = [&](const std::string& name, std::vector<std::int64_t> shape, double value) {
    held.push_back(tensor_bytes(info.prefix + name, at::full(shape, value, at::TensorOptions().dtype(type))));
  };
  held.push_back(tensor_bytes(info.prefix + "embeddings.position_ids",
                              at::arange(info.positions, at::kLong).unsqueeze(0)));
  normal("embeddings.token_embedding.weight", {info.vocab, W}, 0.02);
  normal("embeddings.position_embedding.weight", {info.positions, W}, 0.01);
  for (std::int64_t i = 0; i < info.layers; ++i) {
    const std::string p = "encoder.layers." + std::to_string(i) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      normal(p + "self_attn." + n + ".weight", {W, W}, 0.02);
      normal(p + "self_attn." + n + ".bias", {W}, 0.01);
    }
    constant(p + "layer_norm1.weight", {W}, 1.0);
    constant(p + "layer_norm1.bias", {W}, 0.0);
    normal(p + "mlp.fc1.weight", {M, W}, 0.02);
    normal(p + "mlp.fc1.bias", {M}, 0.01);
    normal(p + "mlp.fc2.weight", {W, M}, 0.02);
    normal(p + "mlp.fc2.bias", {W}, 0.01);
    constant(p + "layer_norm2.weight", {W}, 1.0);
    constant(p + "layer_norm2.bias", {W}, 0.0);
  }
  constant("final_layer_norm.weight", {W}, 1.0);
  constant("final_layer_norm.bias", {W}, 0.0);
  std::vector<TensorData> tensors;
  tensors.reserve(held.size());
  for (const auto& h : held) tensors.push_back(h.data);
  write_safetensors(path, tensors,
                    {{"format", "pt"}, {"speed_erase.synthetic", "text encoder, seed " + std::to_string(seed)}},
                    overwrite);
}

}  // namespace speed
