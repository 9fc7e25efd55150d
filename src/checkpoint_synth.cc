// Seeded synthetic checkpoints in every layout speed-erase reads (tests, benchmarks).
#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "checkpoint_layouts.h"
#include "speed/error.h"
#include "speed/synth.h"

namespace speed {

namespace {

enum class Init { Weight, Norm, Bias, Embedding, PositionIds, Scalar };

struct SynthTensor {
  std::string name;
  Dtype dtype;
  std::vector<std::int64_t> shape;
  std::string key;  // value key: the same key gives the same values in every layout
  Init init;
  double scalar = 0;
};

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

std::uint16_t f32_to_f16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  std::uint32_t sign = (x >> 16) & 0x8000u;
  std::int32_t exp = static_cast<std::int32_t>((x >> 23) & 0xff) - 127 + 15;
  std::uint32_t mant = x & 0x7fffffu;
  if (exp >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);  // values here never overflow
  if (exp <= 0) {
    if (exp < -10) return static_cast<std::uint16_t>(sign);
    mant |= 0x800000u;
    std::uint32_t shift = static_cast<std::uint32_t>(14 - exp);
    std::uint32_t h = mant >> shift;
    std::uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  std::uint32_t h = (static_cast<std::uint32_t>(exp) << 10) | (mant >> 13);
  std::uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return static_cast<std::uint16_t>(sign | h);
}

std::uint16_t f32_to_bf16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

std::uint64_t span_of(const SynthTensor& t) {
  std::uint64_t n = dtype_size(t.dtype);
  for (auto d : t.shape) n *= static_cast<std::uint64_t>(d);
  return n;
}

// Fills `out` (span_of(t) bytes) with the tensor's deterministic values.
void fill(const SynthTensor& t, std::uint64_t seed, std::vector<std::uint8_t>& out) {
  std::int64_t numel = 1;
  for (auto d : t.shape) numel *= d;
  out.resize(span_of(t));
  std::uint64_t state = seed * 0x2545f4914f6cdd1dull ^ fnv1a(t.key);
  double fan_in = 1;
  for (std::size_t i = 1; i < t.shape.size(); ++i) fan_in *= static_cast<double>(t.shape[i]);
  const double wscale = std::sqrt(3.0 / fan_in);
  const std::size_t n = static_cast<std::size_t>(numel);
  if (t.init == Init::PositionIds || t.init == Init::Scalar || (t.dtype != Dtype::F32 && t.dtype != Dtype::F16 &&
                                                                 t.dtype != Dtype::BF16)) {
    for (std::size_t i = 0; i < n; ++i) {
      double v = t.init == Init::Scalar ? t.scalar
                 : t.init == Init::PositionIds
                     ? static_cast<double>(static_cast<std::int64_t>(i) % (t.shape.empty() ? 1 : t.shape.back()))
                     : (static_cast<double>(splitmix(state) >> 40) * (2.0 / 16777216.0) - 1.0) * wscale;
      std::uint8_t* p = out.data() + i * dtype_size(t.dtype);
      switch (t.dtype) {
        case Dtype::F32: { float f = static_cast<float>(v); std::memcpy(p, &f, 4); break; }
        case Dtype::F64: std::memcpy(p, &v, 8); break;
        case Dtype::F16: { auto h = f32_to_f16(static_cast<float>(v)); std::memcpy(p, &h, 2); break; }
        case Dtype::BF16: { auto h = f32_to_bf16(static_cast<float>(v)); std::memcpy(p, &h, 2); break; }
        case Dtype::I64: { auto x = static_cast<std::int64_t>(v); std::memcpy(p, &x, 8); break; }
        case Dtype::I32: { auto x = static_cast<std::int32_t>(v); std::memcpy(p, &x, 4); break; }
        default: fail("synth: unsupported dtype {}", dtype_name(t.dtype));
      }
    }
    return;
  }
  // Hot path (weights of full-size files): value = offset + scale * u, u uniform in [-1, 1).
  float scale = 0, offset = 0;
  switch (t.init) {
    case Init::Weight: scale = static_cast<float>(wscale); break;
    case Init::Norm: scale = 0.1f; offset = 1.0f; break;
    case Init::Bias: scale = 0.02f; break;
    case Init::Embedding: scale = 0.5f; break;
    default: break;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const float u = static_cast<float>(static_cast<std::int32_t>(splitmix(state) >> 40) - (1 << 23)) * (1.0f / 8388608.0f);
    const float v = offset + scale * u;
    if (t.dtype == Dtype::F32) {
      std::memcpy(out.data() + 4 * i, &v, 4);
    } else {
      const std::uint16_t h = t.dtype == Dtype::F16 ? f32_to_f16(v) : f32_to_bf16(v);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
}

// ---- tensor lists ----

struct Builder {
  const SynthOptions& o;
  const SynthGeometry& g;
  std::vector<SynthTensor> list;

  void add(std::string name, std::vector<std::int64_t> shape, std::string key = {}, Dtype dtype = Dtype::F32,
           bool keep_dtype = false) {
    SynthTensor t;
    t.key = key.empty() ? name : key;
    t.dtype = keep_dtype ? dtype : o.dtype;
    const bool bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
    if (shape.size() >= 2) {
      t.init = name.find("embedding") != std::string::npos || name.find("positional") != std::string::npos
                   ? Init::Embedding
                   : Init::Weight;
    } else {
      t.init = bias ? Init::Bias : Init::Norm;
    }
    t.name = std::move(name);
    t.shape = std::move(shape);
    list.push_back(std::move(t));
  }
  void scalar(std::string name, Dtype dtype, double v) {
    add(std::move(name), {}, {}, dtype, true);
    list.back().init = Init::Scalar;
    list.back().scalar = v;
  }
};

struct LevelPlan {
  std::vector<std::int64_t> mult;
  std::vector<int> depth;  // transformer blocks per attention (0: no attention)
  int mid_depth;
};

LevelPlan plan(Family f) {
  if (f == Family::SDXL) return {{1, 2, 4}, {0, 2, 10}, 10};
  return {{1, 2, 4, 4}, {1, 1, 1, 0}, 1};
}

// UNet tensors; names are LDM (`prefix` + ldm) or diffusers (`prefix` + diffusers), values keyed
// by the diffusers name so that every layout carries the same weights.
void add_unet(Builder& b, const std::string& prefix, bool diffusers) {
  const auto& g = b.g;
  const LevelPlan p = plan(b.o.family);
  const std::int64_t c0 = g.base_channels, temb = 4 * c0, ctx = g.context_dim;
  const bool linear = b.o.family != Family::SD1;
  const std::int64_t k = b.o.full_size ? 3 : 1;  // tiny files use 1x1 resnet convs (size)
  auto put = [&](const std::string& ldm, const std::string& dif, std::vector<std::int64_t> shape) {
    b.add(prefix + (diffusers ? dif : ldm), std::move(shape), "unet." + dif);
  };
  auto res = [&](const std::string& l, const std::string& d, std::int64_t cin, std::int64_t c) {
    put(l + ".in_layers.0.weight", d + ".norm1.weight", {cin});
    put(l + ".in_layers.0.bias", d + ".norm1.bias", {cin});
    put(l + ".in_layers.2.weight", d + ".conv1.weight", {c, cin, k, k});
    put(l + ".in_layers.2.bias", d + ".conv1.bias", {c});
    put(l + ".emb_layers.1.weight", d + ".time_emb_proj.weight", {c, temb});
    put(l + ".emb_layers.1.bias", d + ".time_emb_proj.bias", {c});
    put(l + ".out_layers.0.weight", d + ".norm2.weight", {c});
    put(l + ".out_layers.0.bias", d + ".norm2.bias", {c});
    put(l + ".out_layers.3.weight", d + ".conv2.weight", {c, c, k, k});
    put(l + ".out_layers.3.bias", d + ".conv2.bias", {c});
    if (cin != c) {
      put(l + ".skip_connection.weight", d + ".conv_shortcut.weight", {c, cin, 1, 1});
      put(l + ".skip_connection.bias", d + ".conv_shortcut.bias", {c});
    }
  };
  auto attn = [&](const std::string& l, const std::string& d, std::int64_t c, int depth) {
    auto both = [&](const std::string& s, std::vector<std::int64_t> shape) { put(l + s, d + s, std::move(shape)); };
    both(".norm.weight", {c});
    both(".norm.bias", {c});
    if (b.o.proj_in) {
      both(".proj_in.weight", linear ? std::vector<std::int64_t>{c, c} : std::vector<std::int64_t>{c, c, 1, 1});
      both(".proj_in.bias", {c});
    }
    for (int t = 0; t < depth; ++t) {
      const std::string tb = fmt::format(".transformer_blocks.{}", t);
      for (const char* a : {".attn1", ".attn2"}) {
        const bool cross = std::strcmp(a, ".attn2") == 0;
        both(tb + a + ".to_q.weight", {c, c});
        both(tb + a + ".to_k.weight", {c, cross ? ctx : c});
        both(tb + a + ".to_v.weight", {c, cross ? ctx : c});
        both(tb + a + ".to_out.0.weight", {c, c});
        both(tb + a + ".to_out.0.bias", {c});
      }
      if (b.o.full_size || t == 0) {  // tiny files keep one feed-forward per container (size)
        const std::int64_t inner = b.o.full_size ? 4 * c : c;  // GEGLU: proj is 2 x inner wide
        both(tb + ".ff.net.0.proj.weight", {2 * inner, c});
        both(tb + ".ff.net.0.proj.bias", {2 * inner});
        both(tb + ".ff.net.2.weight", {c, inner});
        both(tb + ".ff.net.2.bias", {c});
      }
      for (const char* n : {".norm1", ".norm2", ".norm3"}) {
        both(tb + n + ".weight", {c});
        both(tb + n + ".bias", {c});
      }
    }
    both(".proj_out.weight", linear ? std::vector<std::int64_t>{c, c} : std::vector<std::int64_t>{c, c, 1, 1});
    both(".proj_out.bias", {c});
  };

  put("time_embed.0.weight", "time_embedding.linear_1.weight", {temb, c0});
  put("time_embed.0.bias", "time_embedding.linear_1.bias", {temb});
  put("time_embed.2.weight", "time_embedding.linear_2.weight", {temb, temb});
  put("time_embed.2.bias", "time_embedding.linear_2.bias", {temb});
  if (b.o.family == Family::SDXL) {
    const std::int64_t adm = b.o.full_size ? 2816 : 64;
    put("label_emb.0.0.weight", "add_embedding.linear_1.weight", {temb, adm});
    put("label_emb.0.0.bias", "add_embedding.linear_1.bias", {temb});
    put("label_emb.0.2.weight", "add_embedding.linear_2.weight", {temb, temb});
    put("label_emb.0.2.bias", "add_embedding.linear_2.bias", {temb});
  }
  put("input_blocks.0.0.weight", "conv_in.weight", {c0, 4, 3, 3});
  put("input_blocks.0.0.bias", "conv_in.bias", {c0});
  const int levels = static_cast<int>(p.mult.size());
  std::vector<std::int64_t> skips{c0};
  std::int64_t ch = c0;
  for (int l = 0; l < levels; ++l) {
    const std::int64_t c = p.mult[static_cast<std::size_t>(l)] * c0;
    for (int r = 0; r < 2; ++r) {
      const int i = 1 + 3 * l + r;
      res(fmt::format("input_blocks.{}.0", i), fmt::format("down_blocks.{}.resnets.{}", l, r), ch, c);
      ch = c;
      if (p.depth[static_cast<std::size_t>(l)] > 0) {
        attn(fmt::format("input_blocks.{}.1", i), fmt::format("down_blocks.{}.attentions.{}", l, r), c,
             p.depth[static_cast<std::size_t>(l)]);
      }
      skips.push_back(c);
    }
    if (l + 1 < levels) {
      put(fmt::format("input_blocks.{}.0.op.weight", 3 * l + 3), fmt::format("down_blocks.{}.downsamplers.0.conv.weight", l),
          {c, c, k, k});
      put(fmt::format("input_blocks.{}.0.op.bias", 3 * l + 3), fmt::format("down_blocks.{}.downsamplers.0.conv.bias", l), {c});
      skips.push_back(c);
    }
  }
  res("middle_block.0", "mid_block.resnets.0", ch, ch);
  attn("middle_block.1", "mid_block.attentions.0", ch, p.mid_depth);
  res("middle_block.2", "mid_block.resnets.1", ch, ch);
  for (int j = 0; j < levels; ++j) {
    const int l = levels - 1 - j;
    const std::int64_t c = p.mult[static_cast<std::size_t>(l)] * c0;
    const int depth = p.depth[static_cast<std::size_t>(l)];
    for (int r = 0; r < 3; ++r) {
      const int i = 3 * j + r;
      const std::int64_t cin = ch + skips.back();
      skips.pop_back();
      res(fmt::format("output_blocks.{}.0", i), fmt::format("up_blocks.{}.resnets.{}", j, r), cin, c);
      ch = c;
      if (depth > 0) attn(fmt::format("output_blocks.{}.1", i), fmt::format("up_blocks.{}.attentions.{}", j, r), c, depth);
      if (r == 2 && l > 0) {
        const int sub = depth > 0 ? 2 : 1;
        put(fmt::format("output_blocks.{}.{}.conv.weight", i, sub), fmt::format("up_blocks.{}.upsamplers.0.conv.weight", j),
            {c, c, k, k});
        put(fmt::format("output_blocks.{}.{}.conv.bias", i, sub), fmt::format("up_blocks.{}.upsamplers.0.conv.bias", j), {c});
      }
    }
  }
  put("out.0.weight", "conv_norm_out.weight", {c0});
  put("out.0.bias", "conv_norm_out.bias", {c0});
  put("out.2.weight", "conv_out.weight", {4, c0, 3, 3});
  put("out.2.bias", "conv_out.bias", {4});
}

// A text encoder under `prefix`; `value_slot` keys the values (same weights in every layout).
void add_text_encoder(Builder& b, const std::string& prefix, TextNaming naming, std::int64_t w, std::int64_t layers,
                      int value_slot, bool projection) {
  const std::int64_t v = b.g.vocab, pos = 77, mlp = 4 * w;
  const std::string vk = fmt::format("te{}.", value_slot);
  if (naming == TextNaming::HF) {
    auto put = [&](const std::string& s, std::vector<std::int64_t> shape) { b.add(prefix + s, std::move(shape), vk + s); };
    put("embeddings.token_embedding.weight", {v, w});
    put("embeddings.position_embedding.weight", {pos, w});
    b.add(prefix + "embeddings.position_ids", {1, pos}, vk + "position_ids", Dtype::I64, true);
    b.list.back().init = Init::PositionIds;
    for (std::int64_t i = 0; i < layers; ++i) {
      const std::string l = fmt::format("encoder.layers.{}.", i);
      for (const char* p : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
        put(l + "self_attn." + p + ".weight", {w, w});
        put(l + "self_attn." + p + ".bias", {w});
      }
      for (const char* n : {"layer_norm1", "layer_norm2"}) {
        put(l + n + ".weight", {w});
        put(l + n + ".bias", {w});
      }
      put(l + "mlp.fc1.weight", {mlp, w});
      put(l + "mlp.fc1.bias", {mlp});
      put(l + "mlp.fc2.weight", {w, mlp});
      put(l + "mlp.fc2.bias", {w});
    }
    put("final_layer_norm.weight", {w});
    put("final_layer_norm.bias", {w});
    if (projection) {
      std::string parent = prefix.substr(0, prefix.size() - std::strlen("text_model."));
      b.add(parent + "text_projection.weight", {w, w}, vk + "text_projection");
    }
    return;
  }
  auto put = [&](const std::string& s, std::vector<std::int64_t> shape) { b.add(prefix + s, std::move(shape), vk + s); };
  put("token_embedding.weight", {v, w});
  put("positional_embedding", {pos, w});
  for (std::int64_t i = 0; i < layers; ++i) {
    const std::string l = fmt::format("transformer.resblocks.{}.", i);
    put(l + "ln_1.weight", {w});
    put(l + "ln_1.bias", {w});
    put(l + "attn.in_proj_weight", {3 * w, w});
    put(l + "attn.in_proj_bias", {3 * w});
    put(l + "attn.out_proj.weight", {w, w});
    put(l + "attn.out_proj.bias", {w});
    put(l + "ln_2.weight", {w});
    put(l + "ln_2.bias", {w});
    put(l + "mlp.c_fc.weight", {mlp, w});
    put(l + "mlp.c_fc.bias", {mlp});
    put(l + "mlp.c_proj.weight", {w, mlp});
    put(l + "mlp.c_proj.bias", {w});
  }
  put("ln_final.weight", {w});
  put("ln_final.bias", {w});
  put("text_projection", {w, w});
  b.scalar(prefix + "logit_scale", b.o.dtype == Dtype::F64 ? Dtype::F64 : Dtype::F32, 4.6052);
}

std::vector<SynthTensor> single_file_tensors(const SynthOptions& o, const SynthGeometry& g) {
  Builder b{o, g, {}};
  if (o.layout == SynthLayout::UNetLDM || o.layout == SynthLayout::UNetDiffusers) {
    add_unet(b, "", o.layout == SynthLayout::UNetDiffusers);
    return b.list;
  }
  switch (o.family) {
    case Family::SD1:
      add_text_encoder(b, o.old_sd1_text ? "cond_stage_model.transformer." : "cond_stage_model.transformer.text_model.",
                       TextNaming::HF, g.te_width[0], g.te_layers[0], 0, false);
      break;
    case Family::SD2:
      add_text_encoder(b, "cond_stage_model.model.", TextNaming::OpenCLIP, g.te_width[0], g.te_layers[0], 0, false);
      break;
    case Family::SDXL:
      add_text_encoder(b, "conditioner.embedders.0.transformer.text_model.", TextNaming::HF, g.te_width[0],
                       g.te_layers[0], 0, false);
      add_text_encoder(b, "conditioner.embedders.1.model.", TextNaming::OpenCLIP, g.te_width[1], g.te_layers[1], 1,
                       false);
      break;
  }
  const std::size_t unet_begin = b.list.size();
  add_unet(b, "model.diffusion_model.", false);
  const std::size_t unet_end = b.list.size();
  b.add("first_stage_model.quant_conv.weight", {8, 8, 1, 1});
  b.add("first_stage_model.decoder.conv_out.weight", {3, 8, 3, 3});
  b.add("first_stage_model.decoder.conv_out.bias", {3});
  if (o.ema) {
    b.scalar("model_ema.decay", Dtype::F32, 0.9999);
    b.scalar("model_ema.num_updates", Dtype::I32, 0);
    for (std::size_t i = unet_begin; i < unet_end; ++i) {
      SynthTensor t = b.list[i];
      t.name = ema_twin_name(t.name);
      t.key = "ema." + t.key;  // close to, but not equal to, the live weights
      b.list.push_back(std::move(t));
    }
  }
  return b.list;
}

std::vector<TensorData> header_of(const std::vector<SynthTensor>& list) {
  std::vector<TensorData> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back({t.name, t.dtype, t.shape, nullptr, static_cast<std::size_t>(span_of(t))});
  return out;
}

Metadata synth_metadata(const SynthOptions& o) {
  return {{"format", "pt"},
          {"speed.synth", fmt::format("{} {} seed {}", family_name(o.family), o.full_size ? "full-size" : "tiny", o.seed)}};
}

void write_list(const std::string& path, const std::vector<SynthTensor>& list, const Metadata& md, std::uint64_t seed) {
  SafetensorsWriter w(path, header_of(list), md, /*overwrite=*/true);
  std::vector<std::uint8_t> buf;
  for (const auto& t : list) {
    fill(t, seed, buf);
    w.write(buf.data(), buf.size());
  }
  w.commit();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  SPEED_CHECK(out.good(), "cannot write '{}'", path);
}

void make_dir(const std::string& path) {
  if (::mkdir(path.c_str(), 0777) != 0 && errno != EEXIST) fail("cannot create folder '{}': {}", path, std::strerror(errno));
}

void copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  SPEED_CHECK(in.good(), "cannot read '{}'", from);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out << in.rdbuf();
  SPEED_CHECK(out.good(), "cannot write '{}'", to);
}

void write_diffusers(const std::string& dir, const SynthOptions& o, const SynthGeometry& g) {
  make_dir(dir);
  const std::string var = o.variant.empty() ? "" : "." + o.variant;
  make_dir(dir + "/unet");
  Builder ub{o, g, {}};
  add_unet(ub, "", true);
  const Metadata md = synth_metadata(o);
  if (o.shards <= 1) {
    write_list(dir + "/unet/diffusion_pytorch_model" + var + ".safetensors", ub.list, md, o.seed);
  } else {
    nlohmann::ordered_json index;
    std::uint64_t total = 0;
    for (const auto& t : ub.list) total += span_of(t);
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = nlohmann::ordered_json::object();
    const std::size_t n = ub.list.size(), per = (n + static_cast<std::size_t>(o.shards) - 1) / static_cast<std::size_t>(o.shards);
    for (int s = 0; s < o.shards; ++s) {
      const std::string file = fmt::format("diffusion_pytorch_model{}-{:05d}-of-{:05d}.safetensors", var, s + 1, o.shards);
      std::vector<SynthTensor> part;
      for (std::size_t i = static_cast<std::size_t>(s) * per; i < std::min(n, static_cast<std::size_t>(s + 1) * per); ++i) {
        part.push_back(ub.list[i]);
        index["weight_map"][ub.list[i].name] = file;
      }
      write_list(dir + "/unet/" + file, part, md, o.seed);
    }
    write_text(dir + "/unet/diffusion_pytorch_model.safetensors.index" + var + ".json", index.dump(2) + "\n");
  }
  write_text(dir + "/unet/config.json",
             nlohmann::ordered_json{{"_class_name", "UNet2DConditionModel"}, {"cross_attention_dim", g.context_dim}}.dump(2) + "\n");

  const char* sub[] = {"text_encoder", "text_encoder_2"};
  const char* tok[] = {"tokenizer", "tokenizer_2"};
  nlohmann::ordered_json model_index{{"_class_name", o.family == Family::SDXL ? "StableDiffusionXLPipeline" : "StableDiffusionPipeline"},
                                     {"unet", {"diffusers", "UNet2DConditionModel"}}};
  for (int slot = 0; slot < g.text_encoders; ++slot) {
    const std::string td = dir + "/" + sub[slot];
    make_dir(td);
    Builder tb{o, g, {}};
    std::int64_t layers = g.te_layers[slot];
    if (o.family == Family::SD2) layers -= 1;  // diffusers keeps 23 of OpenCLIP-H's 24 layers
    add_text_encoder(tb, "text_model.", TextNaming::HF, g.te_width[slot], layers, slot, slot == 1);
    write_list(td + "/model" + var + ".safetensors", tb.list, md, o.seed);
    const bool quick = o.family == Family::SD1 || (o.family == Family::SDXL && slot == 0);
    if (o.config_json) {
      nlohmann::ordered_json cfg{{"architectures", {slot == 1 ? "CLIPTextModelWithProjection" : "CLIPTextModel"}},
                                 {"hidden_act", quick ? "quick_gelu" : "gelu"},
                                 {"hidden_size", g.te_width[slot]},
                                 {"intermediate_size", 4 * g.te_width[slot]},
                                 {"max_position_embeddings", 77},
                                 {"num_attention_heads", g.te_width[slot] / 64},
                                 {"num_hidden_layers", layers},
                                 {"vocab_size", g.vocab}};
      write_text(td + "/config.json", cfg.dump(2) + "\n");
    }
    model_index[sub[slot]] = {"transformers", slot == 1 ? "CLIPTextModelWithProjection" : "CLIPTextModel"};
    if (!o.tokenizer_source.empty()) {
      make_dir(dir + "/" + tok[slot]);
      for (const char* f : {"vocab.json", "merges.txt"}) copy_file(o.tokenizer_source + "/" + f, dir + "/" + tok[slot] + "/" + f);
      model_index[tok[slot]] = {"transformers", "CLIPTokenizer"};
    }
  }
  write_text(dir + "/model_index.json", model_index.dump(2) + "\n");
}

}  // namespace

SynthGeometry synth_geometry(const SynthOptions& o) {
  SynthGeometry g;
  g.base_channels = o.full_size ? 320 : o.family == Family::SDXL ? 16 : 32;
  g.vocab = o.full_size ? 49408 : o.vocab;
  switch (o.family) {
    case Family::SD1:
      g.te_width[0] = o.full_size ? 768 : 64;
      g.te_layers[0] = o.full_size ? 12 : 2;
      break;
    case Family::SD2:
      g.te_width[0] = o.full_size ? 1024 : 64;
      g.te_layers[0] = o.full_size ? 24 : 3;
      break;
    case Family::SDXL:
      g.text_encoders = 2;
      g.te_width[0] = o.full_size ? 768 : 64;
      g.te_layers[0] = o.full_size ? 12 : 2;
      g.te_width[1] = o.full_size ? 1280 : 64;
      g.te_layers[1] = o.full_size ? 32 : 3;
      break;
  }
  g.context_dim = g.te_width[0] + g.te_width[1];
  return g;
}

std::string synth_safetensors(const SynthOptions& o) {
  SPEED_CHECK(o.layout != SynthLayout::Diffusers, "synth_safetensors: a diffusers layout is a folder; use write_synth_checkpoint");
  const SynthGeometry g = synth_geometry(o);
  auto list = single_file_tensors(o, g);
  std::string header = make_header(header_of(list), synth_metadata(o));
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  out += header;
  std::vector<std::uint8_t> buf;
  for (const auto& t : list) {
    fill(t, o.seed, buf);
    out.append(reinterpret_cast<const char*>(buf.data()), buf.size());
  }
  return out;
}

void write_synth_checkpoint(const std::string& path, const SynthOptions& o) {
  const SynthGeometry g = synth_geometry(o);
  if (o.layout == SynthLayout::Diffusers) {
    write_diffusers(path, o, g);
    return;
  }
  write_list(path, single_file_tensors(o, g), synth_metadata(o), o.seed);
}

}  // namespace speed
