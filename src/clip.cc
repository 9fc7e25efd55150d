// The CLIP text transformer forward pass and the weights hash.
//
// Pre-LN blocks: x += out_proj(attn(LN1(x))); x += fc2(act(fc1(LN2(x)))). Shapes below use
// B = batch, T = new tokens, P = prefix tokens, S = P + T, H = heads, D = head dim, W = H * D.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <limits>

#include "clip_internal.h"
#include "speed/error.h"
#include "speed/tensor.h"

namespace speed {

using namespace clip_detail;

TextEncoder::TextEncoder(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TextEncoder::~TextEncoder() = default;

const TextEncoderInfo& TextEncoder::info() const { return impl_->info; }
at::ScalarType TextEncoder::dtype() const { return impl_->dtype; }
at::Device TextEncoder::device() const { return impl_->device; }
int TextEncoder::layers_run() const { return impl_->layers_run; }
bool TextEncoder::widens_per_layer() const { return impl_->widen; }

std::vector<std::pair<std::string, at::Tensor>> TextEncoder::named_parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : impl_->model->named_parameters(/*recurse=*/true)) {
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

namespace {

// ids [B, T] -> validated int64 on `device`.
at::Tensor check_ids(const at::Tensor& ids, const TextEncoderInfo& info, std::int64_t offset,
                     at::Device device) {
  SPEED_CHECK(ids.defined() && ids.dim() == 2, "token ids must be a [batch, tokens] tensor, got {}",
              ids.defined() ? shape_string(ids.sizes()) : std::string("nothing"));
  SPEED_CHECK(!at::isFloatingType(ids.scalar_type()) && ids.scalar_type() != at::kBool,
              "token ids must be integers, got dtype {}", ids.scalar_type());
  const std::int64_t T = ids.size(1);
  SPEED_CHECK(T >= 1 && offset + T <= info.positions,
              "{} token ids after a prefix of {} exceed the encoder's {} positions", T, offset,
              info.positions);
  at::Tensor out = ids.to(device, at::kLong).contiguous();
  if (out.numel() > 0) {
    const auto lo = out.min().item<std::int64_t>(), hi = out.max().item<std::int64_t>();
    SPEED_CHECK(lo >= 0 && hi < info.vocab, "token id {} is outside the vocabulary of {} ids",
                lo < 0 ? lo : hi, info.vocab);
  }
  return out;
}

// The forward pass over several id batches [B_g, T_g] at once: the linear layers and the MLP
// run on the rows of all batches packed into one [M, W] matrix (one pass over the weights for
// the whole call), attention runs per batch. Each row depends only on its own prompt (and the
// prefix). When `capture` is set (one batch only), records each layer's keys and values.
std::vector<at::Tensor> run(const TextEncoder::Impl& impl,
                            const std::vector<TextEncoder::Input>& in,
                            TextEncoder::Prefix* capture) {
  c10::InferenceMode guard;
  SPEED_CHECK(impl.options.weights, "text encoder '{}' was loaded for validation only (no weights)",
              impl.info.prefix);
  SPEED_CHECK(!capture || in.size() == 1, "prefix capture takes one batch, got {}", in.size());
  const ClipText& m = *impl.model;
  const std::int64_t W = impl.info.width, H = impl.heads, D = W / H;
  const auto opts = at::TensorOptions().dtype(impl.dtype).device(impl.device);
  const std::size_t G = in.size();
  std::vector<std::int64_t> Bs(G), Ts(G), Ps(G), offs(G + 1, 0);
  std::vector<at::Tensor> xs, masks(G);
  for (std::size_t g = 0; g < G; ++g) {
    const TextEncoder::Input& inp = in[g];
    SPEED_CHECK(inp.after < static_cast<int>(g),
                "batch {} comes after batch {}: only an earlier batch can precede it", g,
                inp.after);
    SPEED_CHECK(inp.after < 0 || !inp.prefix,
                "batch {} has both a prefix and an earlier batch before it", g);
    std::int64_t P = inp.prefix ? inp.prefix->length : 0;
    if (inp.after >= 0) {
      const auto a = static_cast<std::size_t>(inp.after);
      SPEED_CHECK(inp.after_row >= 0 && inp.after_row < Bs[a],
                  "batch {} comes after row {} of batch {}, which has {} rows", g, inp.after_row,
                  a, Bs[a]);
      P = Ps[a] + Ts[a];
    }
    const at::Tensor ids = check_ids(inp.ids, impl.info, P, impl.device);
    Bs[g] = ids.size(0), Ts[g] = ids.size(1), Ps[g] = P;
    offs[g + 1] = offs[g] + Bs[g] * Ts[g];
    if (Bs[g] == 0) continue;
    // Gather from the stored-dtype table, then widen only the rows used.
    at::Tensor x = m.embeddings->token_embedding->weight.index_select(0, ids.view({-1}))
                       .to(impl.dtype)
                       .view({Bs[g], Ts[g], W});
    x.add_(m.embeddings->position_embedding->weight.narrow(0, P, Ts[g]));
    xs.push_back(x.view({Bs[g] * Ts[g], W}));
    // Causal mask over [T, S]: new token i sees prefix tokens and new tokens 0..i.
    masks[g] = at::full({Ts[g], P + Ts[g]}, -std::numeric_limits<double>::infinity(), opts)
                   .triu(P + 1);
  }
  std::vector<at::Tensor> out(G);
  if (xs.empty()) {
    for (std::size_t g = 0; g < G; ++g) out[g] = at::empty({Bs[g], Ts[g], W}, opts);
    return out;
  }
  at::Tensor x = xs.size() == 1 ? xs[0] : at::cat(xs, 0);  // [M, W]
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const bool quick = impl.info.activation == Activation::QuickGELU;

  // impl.widen: each weight matrix is widened into a buffer of its shape just before use; the
  // four buffers serve every layer (a stored float32 matrix is used in place).
  std::vector<at::Tensor> buffers(4);
  auto weight = [&](std::size_t slot, const std::vector<at::Tensor>& parts) {
    if (parts.size() == 1 && parts[0].scalar_type() == impl.dtype && parts[0].is_contiguous())
      return parts[0];
    std::int64_t rows = 0;
    for (const at::Tensor& p : parts) rows += p.size(0);
    at::Tensor& buf = buffers[slot];
    if (!buf.defined()) buf = at::empty({rows, parts[0].size(1)}, opts);
    std::int64_t r = 0;
    for (const at::Tensor& p : parts) widen_into(p, buf.narrow(0, r, p.size(0))), r += p.size(0);
    return buf;
  };

  // Keys/values [B, H, S, D] of this layer, kept only for batches that a later one continues.
  std::vector<at::Tensor> os, keys(G), values(G);
  std::vector<bool> continued(G, false);
  for (const TextEncoder::Input& inp : in)
    if (inp.after >= 0) continued[static_cast<std::size_t>(inp.after)] = true;
  for (int l = 0; l < impl.layers_run; ++l) {
    const Block& blk = *m.encoder->layers->blocks[l];
    const Attention& a = *blk.self_attn;
    const Mlp& mlp = *blk.mlp;
    at::Tensor h = at::layer_norm(x, {W}, blk.layer_norm1->weight, blk.layer_norm1->bias, 1e-5);
    const at::Tensor qkv_all = dense(h, impl.widen ? weight(0, a.in_src) : a.in_w, a.in_b);  // [M, 3W]
    os.clear();
    for (std::size_t g = 0; g < G; ++g) {
      const std::int64_t B = Bs[g], T = Ts[g], P = Ps[g];
      if (B == 0) continue;
      at::Tensor qkv = qkv_all.narrow(0, offs[g], B * T).view({B, T, 3, H, D}).permute({2, 0, 3, 1, 4});
      at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];  // [B, H, T, D]
      if (capture) {
        capture->keys.push_back(k.contiguous());
        capture->values.push_back(v.contiguous());
      }
      if (const TextEncoder::Prefix* pf = in[g].prefix) {
        k = at::cat({pf->keys[l].expand({B, H, P, D}), k}, 2);  // [B, H, S, D]
        v = at::cat({pf->values[l].expand({B, H, P, D}), v}, 2);
      } else if (in[g].after >= 0) {  // this layer's keys/values of the earlier batch's row
        const auto a = static_cast<std::size_t>(in[g].after);
        k = at::cat({keys[a].narrow(0, in[g].after_row, 1).expand({B, H, P, D}), k}, 2);
        v = at::cat({values[a].narrow(0, in[g].after_row, 1).expand({B, H, P, D}), v}, 2);
      }
      if (continued[g]) {  // without a prefix, k and v are views of qkv_all: copy, not pin it
        keys[g] = P == 0 ? k.clone() : k;
        values[g] = P == 0 ? v.clone() : v;
      }
      at::Tensor scores = at::matmul(q, k.transpose(-2, -1)).mul_(scale).add_(masks[g]);  // [B, H, T, S]
      at::Tensor o = at::matmul(at::softmax(scores, -1), v);  // [B, H, T, D]
      os.push_back(o.permute({0, 2, 1, 3}).reshape({B * T, W}));
    }
    auto matrix = [&](std::size_t slot, const at::Tensor& w) {
      return impl.widen ? weight(slot, {w}) : w;
    };
    x.add_(dense(os.size() == 1 ? os[0] : at::cat(os, 0), matrix(1, a.out_proj->weight),
                 a.out_proj->bias));
    h = at::layer_norm(x, {W}, blk.layer_norm2->weight, blk.layer_norm2->bias, 1e-5);
    h = dense(h, matrix(2, mlp.fc1->weight), mlp.fc1->bias);
    h = quick ? h.mul_(at::sigmoid(h * 1.702)) : at::gelu(h);
    x.add_(dense(h, matrix(3, mlp.fc2->weight), mlp.fc2->bias));
  }
  if (m.final_layer_norm) {
    x = at::layer_norm(x, {W}, m.final_layer_norm->weight, m.final_layer_norm->bias, 1e-5);
  }
  for (std::size_t g = 0; g < G; ++g) {
    out[g] = Bs[g] == 0 ? at::empty({0, Ts[g], W}, opts)
                        : x.narrow(0, offs[g], Bs[g] * Ts[g]).view({Bs[g], Ts[g], W});
  }
  return out;
}

}  // namespace

TextEncoder::Prefix TextEncoder::encode_prefix(const at::Tensor& ids) const {
  SPEED_CHECK(ids.defined() && (ids.dim() == 1 || (ids.dim() == 2 && ids.size(0) == 1)),
              "prefix ids must be [tokens] or [1, tokens], got {}",
              ids.defined() ? shape_string(ids.sizes()) : std::string("nothing"));
  Prefix p;
  const at::Tensor ids2 = ids.dim() == 1 ? ids.unsqueeze(0) : ids;
  p.states = run(*impl_, {Input{ids2}}, &p)[0];
  p.length = ids2.size(1);
  return p;
}

at::Tensor TextEncoder::forward(const at::Tensor& ids, const Prefix* prefix) const {
  return forward_many({ids}, prefix)[0];
}

std::vector<at::Tensor> TextEncoder::forward_many(const std::vector<at::Tensor>& ids,
                                                  const Prefix* prefix) const {
  return forward_many(ids, std::vector<const Prefix*>(prefix ? ids.size() : 0, prefix));
}

std::vector<at::Tensor> TextEncoder::forward_many(const std::vector<at::Tensor>& ids,
                                                  const std::vector<const Prefix*>& prefixes) const {
  SPEED_CHECK(prefixes.empty() || prefixes.size() == ids.size(), "{} prefixes for {} id batches",
              prefixes.size(), ids.size());
  std::vector<Input> in(ids.size());
  for (std::size_t g = 0; g < ids.size(); ++g) {
    in[g].ids = ids[g];
    in[g].prefix = prefixes.empty() ? nullptr : prefixes[g];
  }
  return forward_many(in);
}

std::vector<at::Tensor> TextEncoder::forward_many(const std::vector<Input>& inputs) const {
  for (const Input& x : inputs) {
    const Prefix* prefix = x.prefix;
    if (!prefix) continue;
    SPEED_CHECK(prefix->keys.size() == static_cast<std::size_t>(impl_->layers_run) &&
                    prefix->values.size() == prefix->keys.size(),
                "prefix has {} layers, the encoder runs {}", prefix->keys.size(),
                impl_->layers_run);
    for (const auto& k : prefix->keys)
      SPEED_CHECK(k.dim() == 4 && k.size(0) == 1 && k.size(2) == prefix->length,
                  "prefix keys have shape {}, expected [1, heads, {}, head_dim]",
                  shape_string(k.sizes()), prefix->length);
  }
  return run(*impl_, inputs, nullptr);
}

std::uint64_t TextEncoder::weights_hash() const {
  if (impl_->hashed) return impl_->hash;
  // Fixed-size chunks hashed in parallel; the result does not depend on the thread count.
  constexpr std::size_t kChunk = std::size_t{4} << 20;
  struct Chunk {
    const std::uint8_t* p;
    std::size_t n;
  };
  std::vector<Chunk> chunks;
  std::vector<std::size_t> first(impl_->hash_items.size() + 1, 0);
  for (std::size_t i = 0; i < impl_->hash_items.size(); ++i) {
    const HashItem& it = impl_->hash_items[i];
    first[i] = chunks.size();
    for (std::size_t off = 0; off < it.nbytes; off += kChunk) {
      chunks.push_back({it.bytes + off, std::min(kChunk, it.nbytes - off)});
    }
  }
  first.back() = chunks.size();
  std::vector<std::uint64_t> digests(chunks.size());
  run_tasks(chunks.size(), at::get_num_threads(),
            [&](std::size_t c) { digests[c] = hash64(chunks[c].p, chunks[c].n); });

  const TextEncoderInfo& in = impl_->info;
  const std::string config = fmt::format(
      "speed-clip-v1 layers_run={} final_ln={} act={} heads={} width={} pad={} naming={}",
      impl_->layers_run, in.final_layer_norm, static_cast<int>(in.activation), in.heads, in.width,
      in.pad_id, static_cast<int>(in.naming));
  std::uint64_t h = hash64(config.data(), config.size());
  for (std::size_t i = 0; i < impl_->hash_items.size(); ++i) {
    const HashItem& it = impl_->hash_items[i];
    h = hash_combine(h, hash64(it.name.data(), it.name.size()));
    h = hash_combine(h, static_cast<std::uint64_t>(it.dtype));
    for (auto d : it.shape) h = hash_combine(h, static_cast<std::uint64_t>(d));
    for (std::size_t c = first[i]; c < first[i + 1]; ++c) h = hash_combine(h, digests[c]);
  }
  impl_->hash = h;
  impl_->hashed = true;
  return h;
}

}  // namespace speed
