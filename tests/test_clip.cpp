// clip module: the text transformer against an independent per-head reference, strict
// loading both ways, OpenCLIP mapping, output layers, prefixes, and the fixture's empty prompt.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <catch2/catch.hpp>

#include <set>

#include "speed/checkpoint.h"
#include "speed/clip.h"
#include "speed/error.h"
#include "speed/safetensors.h"
#include "speed/tensor.h"
#include "test_clip_close.h"

using namespace speed;
using speed::test::check_close;

namespace {

const std::string kGolden = std::string(SPEED_SHARED_DIR) + "/golden/";

TextEncoderInfo small_info() {
  TextEncoderInfo in;
  in.prefix = "te.";
  in.vocab = 1000;
  in.positions = 77;
  in.width = 64;
  in.layers = 2;
  in.heads = 2;
  in.mlp = 128;
  return in;
}

// Seeded HF-named weights whose attention and MLP change the residual stream by O(1).
std::map<std::string, at::Tensor> small_weights(const TextEncoderInfo& in, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto rnd = [&](std::vector<std::int64_t> s, double scale) {
    return at::randn(s, gen, at::TensorOptions().dtype(at::kFloat)).mul_(scale);
  };
  const std::int64_t W = in.width, M = in.mlp;
  std::map<std::string, at::Tensor> w;
  w["embeddings.token_embedding.weight"] = rnd({in.vocab, W}, 1.0).to(at::kHalf);
  w["embeddings.position_embedding.weight"] = rnd({in.positions, W}, 0.5);
  for (std::int64_t i = 0; i < in.layers; ++i) {
    const std::string p = "encoder.layers." + std::to_string(i) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      w[p + "self_attn." + n + ".weight"] = rnd({W, W}, 0.3);
      w[p + "self_attn." + n + ".bias"] = rnd({W}, 0.1);
    }
    for (const char* n : {"layer_norm1", "layer_norm2"}) {
      w[p + n + ".weight"] = rnd({W}, 0.2).add_(1.0);
      w[p + n + ".bias"] = rnd({W}, 0.1);
    }
    w[p + "mlp.fc1.weight"] = rnd({M, W}, 0.3);
    w[p + "mlp.fc1.bias"] = rnd({M}, 0.1);
    w[p + "mlp.fc2.weight"] = rnd({W, M}, 0.3);
    w[p + "mlp.fc2.bias"] = rnd({W}, 0.1);
  }
  w["final_layer_norm.weight"] = rnd({W}, 0.2).add_(1.0);
  w["final_layer_norm.bias"] = rnd({W}, 0.1);
  return w;
}

at::Tensor ln(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  at::Tensor mu = x.mean(-1, true), var = (x - mu).pow(2).mean(-1, true);
  return (x - mu) / (var + 1e-5).sqrt() * w + b;
}

// Independent float64 reference: one sequence, one head at a time, explicit mask loop.
at::Tensor reference(const std::map<std::string, at::Tensor>& w64, const TextEncoderInfo& in,
                     const std::vector<std::int64_t>& ids, int layers, bool final_ln) {
  auto W_ = [&](const std::string& k) { return w64.at(k); };
  const std::int64_t T = ids.size(), D = in.width / in.heads;
  at::Tensor x = at::empty({T, in.width}, at::kDouble);
  for (std::int64_t t = 0; t < T; ++t) {
    x[t] = W_("embeddings.token_embedding.weight")[ids[t]] + W_("embeddings.position_embedding.weight")[t];
  }
  at::Tensor mask = at::zeros({T, T}, at::kDouble);
  for (std::int64_t i = 0; i < T; ++i)
    for (std::int64_t j = i + 1; j < T; ++j) mask[i][j] = -1e300;
  for (int l = 0; l < layers; ++l) {
    const std::string p = "encoder.layers." + std::to_string(l) + ".";
    at::Tensor h = ln(x, W_(p + "layer_norm1.weight"), W_(p + "layer_norm1.bias"));
    auto proj = [&](const char* n) {
      return h.mm(W_(p + "self_attn." + n + ".weight").t()) + W_(p + "self_attn." + n + ".bias");
    };
    at::Tensor q = proj("q_proj"), k = proj("k_proj"), v = proj("v_proj");
    std::vector<at::Tensor> heads;
    for (std::int64_t hd = 0; hd < in.heads; ++hd) {
      at::Tensor qh = q.narrow(1, hd * D, D), kh = k.narrow(1, hd * D, D), vh = v.narrow(1, hd * D, D);
      at::Tensor s = qh.mm(kh.t()) / std::sqrt(double(D)) + mask;
      heads.push_back(at::softmax(s, 1).mm(vh));
    }
    x = x + at::cat(heads, 1).mm(W_(p + "self_attn.out_proj.weight").t()) + W_(p + "self_attn.out_proj.bias");
    h = ln(x, W_(p + "layer_norm2.weight"), W_(p + "layer_norm2.bias"));
    h = h.mm(W_(p + "mlp.fc1.weight").t()) + W_(p + "mlp.fc1.bias");
    h = h * at::sigmoid(1.702 * h);
    x = x + h.mm(W_(p + "mlp.fc2.weight").t()) + W_(p + "mlp.fc2.bias");
  }
  if (final_ln) x = ln(x, W_("final_layer_norm.weight"), W_("final_layer_norm.bias"));
  return x;
}

std::map<std::string, at::Tensor> to64(const std::map<std::string, at::Tensor>& w) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, v] : w) out[k] = v.to(at::kDouble);
  return out;
}

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

at::Tensor ids_tensor(const std::vector<std::vector<std::int64_t>>& rows) {
  at::Tensor t = at::empty({static_cast<std::int64_t>(rows.size()), static_cast<std::int64_t>(rows[0].size())}, at::kLong);
  for (std::size_t i = 0; i < rows.size(); ++i)
    for (std::size_t j = 0; j < rows[i].size(); ++j) t[i][j] = rows[i][j];
  return t;
}

}  // namespace

TEST_CASE("module tree spells the HF names; forward matches a per-head float64 reference", "[unit]") {
  const TextEncoderInfo in = small_info();
  const auto w = small_weights(in, 7);
  auto enc32 = TextEncoder::from_tensors(w, in);
  auto enc64 = TextEncoder::from_tensors(w, in, {at::kDouble, "cpu"});

  std::set<std::string> names, want;
  for (const auto& [k, t] : enc32->named_parameters()) names.insert(k);
  for (const auto& [k, t] : w) want.insert(k);
  CHECK(names == want);
  for (const auto& [k, t] : enc32->named_parameters()) {
    INFO(k);
    CHECK(t.sizes() == w.at(k).sizes());
    CHECK(at::equal(t.to(at::kFloat), w.at(k).to(at::kFloat)));
  }

  const std::vector<std::vector<std::int64_t>> rows = {
      {49, 5, 17, 999, 3, 3, 3}, {49, 600, 2, 0, 1, 1, 1}};
  at::Tensor ids = ids_tensor(rows);
  at::Tensor o32 = enc32->forward(ids), o64 = enc64->forward(ids);
  CHECK(o32.scalar_type() == at::kFloat);
  CHECK(o64.scalar_type() == at::kDouble);
  const auto w64 = to64(w);
  for (std::size_t b = 0; b < rows.size(); ++b) {
    at::Tensor ref = reference(w64, in, rows[b], 2, true);
    check_close(o64[b], ref, 1e-10, "float64 vs reference");
    check_close(o32[b], ref, 2e-5, "float32 vs reference");
  }
  // Every row moves when an earlier token changes, none when a later one does (causality).
  at::Tensor ids2 = ids.clone();
  ids2[0][3] = 4;
  at::Tensor o2 = enc64->forward(ids2);
  CHECK(max_abs(o2[0].narrow(0, 0, 3), o64[0].narrow(0, 0, 3)) == 0.0);
  CHECK(max_abs(o2[0].narrow(0, 3, 4), o64[0].narrow(0, 3, 4)) > 1e-2);
}

TEST_CASE("causal prefixes and shared-prefix keys give the full forward's rows", "[unit]") {
  const TextEncoderInfo in = small_info();
  auto enc = TextEncoder::from_tensors(small_weights(in, 3), in);
  at::Tensor full = ids_tensor({{49, 11, 12, 13, 14, 999, 999}, {49, 21, 22, 23, 999, 999, 999}});
  std::vector<std::int64_t> v(77, 999);
  v[0] = 49;
  v[1] = 5;
  at::Tensor ids77 = ids_tensor({v});
  at::Tensor o77 = enc->forward(ids77);
  at::Tensor o7 = enc->forward(full);
  // Truncation to the first j + 1 ids: same rows.
  for (std::int64_t T = 1; T <= 7; ++T) {
    check_close(enc->forward(full.narrow(1, 0, T)), o7.narrow(1, 0, T), 1e-5, "prefix rows");
  }
  check_close(enc->forward(ids77.narrow(1, 0, 2)), o77.narrow(1, 0, 2), 1e-5, "77 vs 2 ids");
  // Shared SOT prefix computed once.
  auto pre = enc->encode_prefix(at::tensor({49}, at::kLong));
  CHECK(pre.length == 1);
  CHECK(pre.keys.size() == 2);
  check_close(pre.states[0], o7[0].narrow(0, 0, 1), 1e-5, "prefix states");
  check_close(enc->forward(full.narrow(1, 1, 6), &pre), o7.narrow(1, 1, 6), 1e-5, "after prefix");
  // A longer shared prefix.
  auto pre3 = enc->encode_prefix(full[0].narrow(0, 0, 3));
  check_close(enc->forward(full[0].narrow(0, 3, 4).unsqueeze(0), &pre3), o7[0].narrow(0, 3, 4).unsqueeze(0),
              1e-5, "after 3-token prefix");
  CHECK_THROWS_WITH(enc->forward(at::zeros({1, 77}, at::kLong), &pre3), Catch::Contains("exceed"));
}

TEST_CASE("a batch can continue after a row of an earlier batch of the same call", "[unit]") {
  const TextEncoderInfo in = small_info();
  auto enc = TextEncoder::from_tensors(small_weights(in, 3), in);
  at::Tensor full = ids_tensor({{49, 11, 12, 13, 14, 999, 999},
                                {49, 21, 22, 23, 999, 999, 999},
                                {49, 11, 30, 31, 32, 33, 999}});
  const at::Tensor want = enc->forward(full);
  std::vector<std::int64_t> v(77, 999);
  v[0] = 49;
  const at::Tensor ids77 = ids_tensor({v});
  const at::Tensor want77 = enc->forward(ids77);
  // 0: SOT alone; 1: two first tokens after SOT; 2: rows 0 and 2 after [SOT, 11] (row 0 of 1);
  // 3: row 1 after [SOT, 21]; 4: row 1 after SOT only; 5: a 77-token batch with no prefix.
  std::vector<TextEncoder::Input> inputs(6);
  inputs[0].ids = ids_tensor({{49}});
  inputs[1].ids = ids_tensor({{11}, {21}});
  inputs[1].after = 0;
  inputs[2].ids = at::stack({full[0].narrow(0, 2, 5), full[2].narrow(0, 2, 5)});
  inputs[2].after = 1, inputs[2].after_row = 0;
  inputs[3].ids = full[1].narrow(0, 2, 5).unsqueeze(0);
  inputs[3].after = 1, inputs[3].after_row = 1;
  inputs[4].ids = full[1].narrow(0, 1, 6).unsqueeze(0);
  inputs[4].after = 0;
  inputs[5].ids = ids77;
  const std::vector<at::Tensor> out = enc->forward_many(inputs);
  REQUIRE(out.size() == 6);
  check_close(out[0][0], want[0].narrow(0, 0, 1), 1e-5, "SOT row");
  check_close(out[1][0], want[0].narrow(0, 1, 1), 1e-5, "first token 11 after SOT");
  check_close(out[1][1], want[1].narrow(0, 1, 1), 1e-5, "first token 21 after SOT");
  check_close(out[2][0], want[0].narrow(0, 2, 5), 1e-5, "prompt 0 after [SOT, 11]");
  check_close(out[2][1], want[2].narrow(0, 2, 5), 1e-5, "prompt 2 after [SOT, 11]");
  check_close(out[3][0], want[1].narrow(0, 2, 5), 1e-5, "prompt 1 after [SOT, 21]");
  check_close(out[4][0], want[1].narrow(0, 1, 6), 1e-5, "prompt 1 after SOT");
  check_close(out[5], want77, 1e-5, "77 ids, no prefix");
  // The same rows whatever else is in the call.
  const std::vector<at::Tensor> alone = enc->forward_many({inputs[0], inputs[1], inputs[3]});
  check_close(alone[2], out[3], 1e-5, "fewer batches in the call");

  // Misuse names the batch: a later batch, a row out of range, two prefixes, too many ids.
  auto bad = inputs;
  bad[2].after = 2;
  CHECK_THROWS_WITH(enc->forward_many(bad), Catch::Contains("batch 2 comes after batch 2"));
  bad = inputs;
  bad[3].after_row = 2;
  CHECK_THROWS_WITH(enc->forward_many(bad),
                    Catch::Contains("after row 2 of batch 1, which has 2 rows"));
  bad = inputs;
  const auto pre = enc->encode_prefix(at::tensor({49}, at::kLong));
  bad[4].prefix = &pre;
  CHECK_THROWS_WITH(enc->forward_many(bad), Catch::Contains("both a prefix and an earlier batch"));
  bad = inputs;
  bad[5].after = 0;
  CHECK_THROWS_WITH(enc->forward_many(bad),
                    Catch::Contains("77 token ids after a prefix of 1 exceed"));
}

TEST_CASE("weights stored as F16/BF16 and widened per layer give the bytes of float32 weights", "[unit]") {
  const TextEncoderInfo in = small_info();
  const auto w = small_weights(in, 5);
  const at::Tensor ids = ids_tensor({{49, 5, 17, 999, 3}, {49, 600, 2, 0, 1}});
  for (const auto dt : {at::kHalf, at::kBFloat16}) {
    INFO(dt);
    // The stored weights in `dt`, and the same values already in float32.
    std::map<std::string, at::Tensor> low, wide;
    for (const auto& [k, t] : w) {
      low[k] = t.to(dt);
      wide[k] = low[k].to(at::kFloat);
    }
    auto enc_low = TextEncoder::from_tensors(low, in);
    auto enc_wide = TextEncoder::from_tensors(wide, in);
    CHECK(enc_low->widens_per_layer());
    // The block matrices stay in the stored dtype; small tensors are converted.
    for (const auto& [k, p] : enc_low->named_parameters()) {
      INFO(k);
      const bool matrix = p.dim() == 2 && k.find("layers.") != std::string::npos;
      CHECK(p.scalar_type() == (matrix || k == "embeddings.token_embedding.weight" ? dt : at::kFloat));
    }
    const at::Tensor a = enc_low->forward(ids), b = enc_wide->forward(ids);
    CHECK(at::equal(a, b));
    // A second forward reuses the same buffers: still the same bytes.
    CHECK(at::equal(enc_low->forward(ids), b));
  }
  // Float64 compute and no-weights loads convert at load time as before.
  CHECK_FALSE(TextEncoder::from_tensors(w, in, {at::kDouble, "cpu"})->widens_per_layer());
}

TEST_CASE("OpenCLIP naming, output layer and final LN options", "[unit]") {
  TextEncoderInfo in = small_info();
  const auto w = small_weights(in, 11);
  auto hf = TextEncoder::from_tensors(w, in, {at::kDouble, "cpu"});

  // The same weights under OpenCLIP names, with fused in_proj and the tensors SD ignores.
  std::map<std::string, at::Tensor> oc;
  oc["token_embedding.weight"] = w.at("embeddings.token_embedding.weight");
  oc["positional_embedding"] = w.at("embeddings.position_embedding.weight");
  for (int i = 0; i < 2; ++i) {
    const std::string h = "encoder.layers." + std::to_string(i) + ".", o = "transformer.resblocks." + std::to_string(i) + ".";
    oc[o + "attn.in_proj_weight"] = at::cat({w.at(h + "self_attn.q_proj.weight"), w.at(h + "self_attn.k_proj.weight"), w.at(h + "self_attn.v_proj.weight")});
    oc[o + "attn.in_proj_bias"] = at::cat({w.at(h + "self_attn.q_proj.bias"), w.at(h + "self_attn.k_proj.bias"), w.at(h + "self_attn.v_proj.bias")});
    oc[o + "attn.out_proj.weight"] = w.at(h + "self_attn.out_proj.weight");
    oc[o + "attn.out_proj.bias"] = w.at(h + "self_attn.out_proj.bias");
    for (auto [a, b] : {std::pair{"ln_1", "layer_norm1"}, {"ln_2", "layer_norm2"}}) {
      oc[o + a + ".weight"] = w.at(h + b + ".weight");
      oc[o + a + ".bias"] = w.at(h + b + ".bias");
    }
    for (auto [a, b] : {std::pair{"mlp.c_fc", "mlp.fc1"}, {"mlp.c_proj", "mlp.fc2"}}) {
      oc[o + a + ".weight"] = w.at(h + b + ".weight");
      oc[o + a + ".bias"] = w.at(h + b + ".bias");
    }
  }
  oc["ln_final.weight"] = w.at("final_layer_norm.weight");
  oc["ln_final.bias"] = w.at("final_layer_norm.bias");
  oc["text_projection"] = at::zeros({64, 32});
  oc["logit_scale"] = at::scalar_tensor(4.6);
  TextEncoderInfo ino = in;
  ino.naming = TextNaming::OpenCLIP;
  auto open = TextEncoder::from_tensors(oc, ino, {at::kDouble, "cpu"});
  at::Tensor ids = ids_tensor({{49, 7, 8, 9, 999}});
  CHECK(max_abs(open->forward(ids), hf->forward(ids)) == 0.0);
  {
    // Float32 from F16 weights, widened per layer: the fused in_proj and the three HF q/k/v
    // matrices fill the same buffer rows.
    std::map<std::string, at::Tensor> oc16, hf16;
    for (const auto& [k, t] : oc) oc16[k] = t.to(at::kHalf);
    for (const auto& [k, t] : w) hf16[k] = t.to(at::kHalf);
    auto open16 = TextEncoder::from_tensors(oc16, ino), hf16e = TextEncoder::from_tensors(hf16, in);
    REQUIRE(open16->widens_per_layer());
    CHECK(at::equal(open16->forward(ids), hf16e->forward(ids)));
  }
  {
    std::set<std::string> names;
    for (const auto& [k, t] : open->named_parameters()) names.insert(k);
    CHECK(names.count("encoder.layers.1.self_attn.k_proj.weight") == 1);
    CHECK(names.count("embeddings.position_embedding.weight") == 1);
  }

  // SDXL-style: output of layer 1 of 2, no final LN (its tensors and the unused layer allowed).
  TextEncoderInfo pen = in;
  pen.output_layer = 1;
  pen.final_layer_norm = false;
  auto penult = TextEncoder::from_tensors(w, pen, {at::kDouble, "cpu"});
  CHECK(penult->layers_run() == 1);
  const auto w64 = to64(w);
  check_close(penult->forward(ids)[0], reference(w64, in, {49, 7, 8, 9, 999}, 1, false), 1e-10, "layer 1, no LN");
  // SD2-style: penultimate + final LN.
  pen.final_layer_norm = true;
  check_close(TextEncoder::from_tensors(w, pen, {at::kDouble, "cpu"})->forward(ids)[0],
              reference(w64, in, {49, 7, 8, 9, 999}, 1, true), 1e-10, "layer 1 + LN");
  // GELU (erf) differs from QuickGELU.
  TextEncoderInfo gelu = in;
  gelu.activation = Activation::GELU;
  CHECK(max_abs(TextEncoder::from_tensors(w, gelu, {at::kDouble, "cpu"})->forward(ids), hf->forward(ids)) > 1e-3);
}

TEST_CASE("strict loading names the tensor, with got/expected", "[unit]") {
  const TextEncoderInfo in = small_info();
  auto w = small_weights(in, 5);
  {
    auto m = w;
    m.erase("encoder.layers.1.mlp.fc2.bias");
    CHECK_THROWS_WITH(TextEncoder::from_tensors(m, in),
                      Catch::Contains("text encoder tensor 'te.encoder.layers.1.mlp.fc2.bias' is missing"));
  }
  {
    auto m = w;
    m["encoder.layers.0.self_attn.k_proj.weight"] = at::zeros({64, 32});
    CHECK_THROWS_WITH(TextEncoder::from_tensors(m, in),
                      Catch::Contains("tensor 'te.encoder.layers.0.self_attn.k_proj.weight' has shape [64, 32], expected [64, 64]"));
  }
  {
    auto m = w;
    m["encoder.layers.2.mlp.fc1.bias"] = at::zeros({128});
    CHECK_THROWS_WITH(TextEncoder::from_tensors(m, in),
                      Catch::Contains("unexpected tensor 'te.encoder.layers.2.mlp.fc1.bias' under the text encoder prefix 'te.'"));
    m.erase("encoder.layers.2.mlp.fc1.bias");
    m["embeddings.extra"] = at::zeros({1});
    m["zzz"] = at::zeros({1});
    CHECK_THROWS_WITH(TextEncoder::from_tensors(m, in), Catch::Contains("(and 1 more)"));
  }
  {
    auto m = w;
    m["embeddings.token_embedding.weight"] = at::zeros({1000, 64}, at::kInt);
    CHECK_THROWS_WITH(TextEncoder::from_tensors(m, in), Catch::Contains("expected a floating-point dtype"));
  }
  {
    auto m = w;
    m["embeddings.position_ids"] = at::arange(77).unsqueeze(0).to(at::kHalf);  // never trusted
    m["text_projection.weight"] = at::zeros({64, 64});
    m["logit_scale"] = at::zeros({});
    CHECK_NOTHROW(TextEncoder::from_tensors(m, in));
  }
  TextEncoderInfo bad = in;
  bad.heads = 3;
  CHECK_THROWS_WITH(TextEncoder::from_tensors(w, bad), Catch::Contains("multiple of its 3 heads"));
  bad = in;
  bad.output_layer = 3;
  CHECK_THROWS_WITH(TextEncoder::from_tensors(w, bad), Catch::Contains("output layer 3"));
  auto enc = TextEncoder::from_tensors(w, in);
  CHECK_THROWS_WITH(enc->forward(ids_tensor({{49, 1000}})), Catch::Contains("token id 1000 is outside"));
  CHECK_THROWS_WITH(enc->forward(ids_tensor({{-1}})), Catch::Contains("token id -1"));
  CHECK_THROWS_WITH(enc->forward(at::zeros({1, 78}, at::kLong)), Catch::Contains("exceed the encoder's 77 positions"));
  CHECK_THROWS_WITH(enc->forward(at::zeros({1, 2})), Catch::Contains("must be integers"));
  CHECK_THROWS_WITH(enc->forward(at::zeros({2}, at::kLong)), Catch::Contains("[batch, tokens]"));
  CHECK(enc->forward(at::zeros({0, 3}, at::kLong)).sizes() == at::IntArrayRef({0, 3, 64}));
}

TEST_CASE("weights hash: stable, sensitive to bytes and configuration", "[unit]") {
  const TextEncoderInfo in = small_info();
  auto w = small_weights(in, 5);
  const auto h = TextEncoder::from_tensors(w, in)->weights_hash();
  CHECK(TextEncoder::from_tensors(w, in)->weights_hash() == h);
  CHECK(TextEncoder::from_tensors(w, in, {at::kDouble, "cpu"})->weights_hash() == h);
  // Validation-only loading (no weights converted) hashes the same bytes and refuses to run.
  TextEncoderOptions check_only;
  check_only.weights = false;
  auto checked = TextEncoder::from_tensors(w, in, check_only);
  CHECK(checked->weights_hash() == h);
  CHECK_THROWS_WITH(checked->forward(ids_tensor({{49, 5}})),
                    Catch::Contains("loaded for validation only"));
  auto bad = w;
  bad.erase("encoder.layers.1.self_attn.k_proj.bias");
  CHECK_THROWS_WITH(TextEncoder::from_tensors(bad, in, check_only),
                    Catch::Contains("self_attn.k_proj.bias' is missing"));
  auto m = w;
  m["encoder.layers.1.mlp.fc2.bias"] = m["encoder.layers.1.mlp.fc2.bias"].clone();
  m["encoder.layers.1.mlp.fc2.bias"][5] = 0.125f;
  CHECK(TextEncoder::from_tensors(m, in)->weights_hash() != h);
  TextEncoderInfo other = in;
  other.pad_id = 0;
  CHECK(TextEncoder::from_tensors(w, other)->weights_hash() != h);
  other = in;
  other.final_layer_norm = false;
  CHECK(TextEncoder::from_tensors(w, other)->weights_hash() != h);
}

TEST_CASE("fixture text encoder: empty prompt vs the float64 golden, file and folder", "[golden]") {
  auto golden = SafeTensors::open(kGolden + "edits_tiny.safetensors");
  at::Tensor want = tensor_view_unowned(golden, golden.at("empty_prompt/hidden_states"));
  REQUIRE(want.sizes() == at::IntArrayRef({77, 128}));
  std::vector<std::int64_t> ids(77, 49407);
  ids[0] = 49406;
  at::Tensor t = ids_tensor({ids});
  for (const std::string model : {"fixture_tiny_f32.safetensors", "fixture_tiny_diffusers"}) {
    Checkpoint ck = open_checkpoint(kGolden + model);
    REQUIRE(ck.text_encoders.size() == 1);
    auto enc64 = TextEncoder::load(ck, 0, {at::kDouble, "cpu"});
    auto enc32 = TextEncoder::load(ck, 0);
    CHECK(enc64->info().width == 128);
    check_close(enc64->forward(t)[0], want, 1e-9, model + " float64");
    check_close(enc32->forward(t)[0], want, 4e-5, model + " float32");
    // The F16 token table stays a zero-copy view over the mapping.
    for (const auto& [k, p] : enc32->named_parameters()) {
      if (k == "embeddings.token_embedding.weight") CHECK(p.scalar_type() == at::kHalf);
    }
  }
  // Both layouts hold the same bytes, so the same hash.
  CHECK(TextEncoder::load(open_checkpoint(kGolden + "fixture_tiny_f32.safetensors"), 0)->weights_hash() ==
        TextEncoder::load(open_checkpoint(kGolden + "fixture_tiny_diffusers"), 0)->weights_hash());
}
