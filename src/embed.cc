// Prompts -> text-encoder rows (SPEC §1.1): de-duplication, the cache, batching by length, and
// the shared SOT prefix.
//
// Last-subject mode: row j = n - 2 depends only on ids 0..j (causal attention, no padding mask),
// so prompts are grouped by j + 1 and each group runs as dense [b, j] batches after the SOT
// token, whose keys/values are computed once per call: no padding, no batching artefacts.
#include "speed/embed.h"

#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>

#include "embed_cache.h"
#include "speed/clip.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/tensor.h"

namespace speed {

using embed_detail::CacheKey;
using embed_detail::EmbedCache;

std::optional<std::string> default_cache_dir() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && xdg[0] == '/') return (std::filesystem::path(xdg) / "speed-erase").string();
  const char* home = std::getenv("HOME");
  if (home && home[0] != '\0') return (std::filesystem::path(home) / ".cache" / "speed-erase").string();
  return std::nullopt;
}

struct Embedder::Impl {
  // Validated and hashed at construction, converted to the compute dtype only before the first
  // forward: a run whose prompts are all cached converts nothing. (On the CPU in float32 the
  // block matrices are never copied: the forward widens them per layer, src/clip_internal.h.)
  std::vector<std::unique_ptr<TextEncoder>> encoders;
  std::vector<std::pair<std::shared_ptr<const SafeTensors>, TextEncoderInfo>> sources;
  bool loaded = false;
  void load_weights();
  // Options for an encoder whose weights are not converted yet (see load_weights).
  TextEncoderOptions unloaded_options() const {
    TextEncoderOptions eo{options.dtype, options.device};
    eo.weights = false;
    return eo;
  }
  const std::string& combined_hash();
  std::unique_ptr<ClipTokenizer> tokenizer;
  EmbedOptions options;
  std::int64_t width = 0;
  std::string hash;
  std::unique_ptr<EmbedCache> cache;
  std::int64_t hits = 0, misses = 0;

  enum Mode : std::uint32_t { LastSubject = 0, AllTokens = 1 };
  std::vector<at::Tensor> embed(const std::vector<Request>& requests);
  struct Batch {
    Mode mode = LastSubject;
    std::int64_t length = 0;  // ids used per prompt (the same for the whole batch)
    std::vector<const TokenizedPrompt*> prompts;
  };
  // [b, rows, width] for each batch of misses (rows 1 or 77 by the batch's mode); all batches,
  // and the prefixes they share, go through one pass per encoder.
  std::vector<at::Tensor> run_batches(const std::vector<Batch>& batches);
};

Embedder::Embedder(const Checkpoint& ckpt, const std::optional<std::string>& tokenizer_path,
                   EmbedOptions options)
    : impl_(std::make_unique<Impl>()) {
  SPEED_CHECK(!ckpt.text_encoders.empty(), "'{}' has no text encoder", ckpt.path);
  SPEED_CHECK(options.max_batch_tokens >= 1, "the batch cap must be at least 1 token, got {}",
              options.max_batch_tokens);
  impl_->options = options;
  for (std::size_t i = 0; i < ckpt.text_encoders.size(); ++i) {
    impl_->encoders.push_back(TextEncoder::load(ckpt, i, impl_->unloaded_options()));
    impl_->sources.emplace_back(ckpt.files[ckpt.text_encoders[i].file].st, ckpt.text_encoders[i]);
    impl_->width += ckpt.text_encoders[i].width;
  }
  std::optional<std::string> model_tok = ckpt.text_encoders[0].tokenizer_dir
                                             ? ckpt.text_encoders[0].tokenizer_dir
                                             : ckpt.tokenizer_dir;
  const std::string tokenizer_file = find_tokenizer(tokenizer_path, model_tok);
  if (!options.cache_dir) {
    impl_->tokenizer = std::make_unique<ClipTokenizer>(ClipTokenizer::load(tokenizer_file));
    return;
  }
  // The cache key hashes the encoder weights (~0.06 s for CLIP-L's 246 MB) while another thread
  // builds the tokenizer from its merges (~0.07 s for CLIP's); its errors surface here after.
  std::future<ClipTokenizer> tokenizer;
  try {
    tokenizer = std::async(std::launch::async,
                           [&tokenizer_file] { return ClipTokenizer::load(tokenizer_file); });
  } catch (const std::system_error&) {  // no thread to be had: one after the other
  }
  // Embeddings (and DPA directions) computed on a GPU differ from the CPU's in the last bits: a
  // namespace of their own, so that a CPU run's bytes never depend on what a GPU run cached.
  const bool cpu = at::Device(options.device).is_cpu();
  impl_->cache = std::make_unique<EmbedCache>(*options.cache_dir,
                                              weights_hash() + (cpu ? "" : "-cuda"));
  impl_->tokenizer = std::make_unique<ClipTokenizer>(
      tokenizer.valid() ? tokenizer.get() : ClipTokenizer::load(tokenizer_file));
}

Embedder::~Embedder() = default;

void Embedder::Impl::load_weights() {
  if (loaded) return;
  combined_hash();  // from the stored bytes, before the validating encoders go
  for (std::size_t i = 0; i < encoders.size(); ++i) {
    encoders[i] = TextEncoder::load(sources[i].first, sources[i].second,
                                    {options.dtype, options.device});
    // The stored bytes of every converted tensor are no longer read (~246 MB of fp16 for CLIP-L;
    // the token table, gathered in its stored dtype, faults back in only the rows it uses).
    // Tensors already in the compute dtype are used in place and stay, and so does everything
    // when the forward widens the weights per layer from the stored bytes (on the CPU).
    if (encoders[i]->widens_per_layer()) continue;
    const SafeTensors& st = *sources[i].first;
    for (const TensorInfo& t : st.tensors()) {
      const auto dt = try_scalar_type(t.dtype);
      if (t.name.rfind(sources[i].second.prefix, 0) == 0 && dt && *dt != options.dtype)
        st.release_pages(t);
    }
  }
  loaded = true;
}

std::int64_t Embedder::width() const { return impl_->width; }
int Embedder::pad_id() const { return impl_->encoders[0]->info().pad_id; }
const ClipTokenizer& Embedder::tokenizer() const { return *impl_->tokenizer; }
namespace {
CacheKey vector_key(std::uint32_t kind, const std::vector<std::int32_t>& key, std::int64_t n) {
  CacheKey k;
  k.mode = 16 + kind;  // beside modes 0 and 1 (embeddings)
  k.elem_size = 8;
  k.ids = key;
  k.rows = 1;
  k.width = static_cast<std::uint64_t>(n);
  return k;
}
}  // namespace

bool Embedder::get_vector(std::uint32_t kind, const std::vector<std::int32_t>& key,
                          std::int64_t n, double* out) const {
  return impl_->cache && n > 0 && impl_->cache->get(vector_key(kind, key, n), out);
}

void Embedder::put_vector(std::uint32_t kind, const std::vector<std::int32_t>& key, std::int64_t n,
                          const double* data) {
  if (impl_->cache && n > 0) impl_->cache->put(vector_key(kind, key, n), data);
}

bool Embedder::weights_loaded() const { return impl_->loaded; }

void Embedder::release_weights() {
  Impl& m = *impl_;
  if (!m.loaded) return;
  for (std::size_t i = 0; i < m.encoders.size(); ++i)
    m.encoders[i] = TextEncoder::load(m.sources[i].first, m.sources[i].second, m.unloaded_options());
  m.loaded = false;
}
std::int64_t Embedder::cache_hits() const { return impl_->hits; }
std::int64_t Embedder::cache_misses() const { return impl_->misses; }

const std::string& Embedder::Impl::combined_hash() {
  if (hash.empty()) {
    std::uint64_t h = 0;
    for (const auto& e : encoders) h = hash_combine(h, e->weights_hash());
    hash = hex64(h);
  }
  return hash;
}

const std::string& Embedder::weights_hash() const { return impl_->combined_hash(); }

std::vector<TokenizedPrompt> Embedder::tokenize(const std::vector<std::string>& prompts) const {
  std::vector<TokenizedPrompt> out;
  out.reserve(prompts.size());
  for (const auto& p : prompts) out.push_back(impl_->tokenizer->tokenize(p, pad_id()));
  return out;
}

at::Tensor Embedder::last_subject_rows(const std::vector<std::string>& prompts) {
  return last_subject_rows(tokenize(prompts));
}
at::Tensor Embedder::all_tokens(const std::vector<std::string>& prompts) {
  return all_tokens(tokenize(prompts));
}
at::Tensor Embedder::last_subject_rows(const std::vector<TokenizedPrompt>& tokens) {
  return impl_->embed({Request{&tokens, false}})[0];
}
at::Tensor Embedder::all_tokens(const std::vector<TokenizedPrompt>& tokens) {
  return impl_->embed({Request{&tokens, true}})[0];
}
std::vector<at::Tensor> Embedder::embed(const std::vector<Request>& requests) {
  return impl_->embed(requests);
}

std::vector<at::Tensor> Embedder::Impl::run_batches(const std::vector<Batch>& batches) {
  // Last-subject rows need only the ids up to the subject, and every such prompt starts with
  // SOT, whose keys/values are the same for all (causal attention): input 0 of the call is the
  // SOT token alone and the prompts continue after it. Prompts that also share their first
  // content token (first names, templates like "a ...") continue after [SOT, t1] instead: input
  // 1 holds one row per such token (after SOT), and they run from position 2. Only tokens shared
  // by kMinGroup or more prompts (a group costs its own small attention batches). Prefixes and
  // prompts are computed in the same pass over the weights, layer by layer.
  constexpr std::size_t kMinGroup = 4;
  std::int32_t sot_id = -1;  // the SOT id, when a last-subject batch is in the call
  std::map<std::int32_t, std::size_t> group_of;  // first content token -> row of input 1
  std::vector<std::int64_t> group_tokens;
  {
    std::map<std::int32_t, std::size_t> count;
    for (const Batch& batch : batches) {
      if (batch.mode != LastSubject) continue;
      if (sot_id < 0) sot_id = batch.prompts.front()->ids[0];
      if (batch.length >= 3)
        for (const TokenizedPrompt* t : batch.prompts)
          if (t->ids[0] == sot_id) ++count[t->ids[1]];
    }
    for (const auto& [tok, c] : count)
      if (c >= kMinGroup) group_of.emplace(tok, group_tokens.size()), group_tokens.push_back(tok);
  }
  constexpr std::size_t kSotInput = 0, kGroupInput = 1;  // inputs of the call
  std::vector<std::vector<at::Tensor>> parts(batches.size());
  for (std::size_t e = 0; e < encoders.size(); ++e) {
    const TextEncoder& enc = *encoders[e];
    const int pad = enc.info().pad_id;
    const std::int64_t ew = enc.info().width;
    std::vector<TextEncoder::Input> inputs;
    if (sot_id >= 0) {
      inputs.push_back({at::full({1, 1}, sot_id, at::kLong)});
      if (!group_tokens.empty()) {
        TextEncoder::Input g{at::tensor(group_tokens, at::kLong).unsqueeze(1)};
        g.after = static_cast<int>(kSotInput);
        inputs.push_back(std::move(g));
      }
    }
    // One forward input per (batch, prefix): the ids after the prefix, and where its rows go
    // (batch, rows within the batch). A prompt that is SOT alone ("") has SOT's own row.
    struct Run {
      std::size_t batch;
      std::vector<std::int64_t> rows;
      std::size_t input;  // whose outputs are these prompts' rows (last-subject: each last row)
    };
    std::vector<Run> runs;
    std::vector<at::Tensor> outs_e(batches.size());
    for (std::size_t bi = 0; bi < batches.size(); ++bi) {
      const Batch& batch = batches[bi];
      const auto b = static_cast<std::int64_t>(batch.prompts.size());
      const std::int64_t L = batch.length;
      // Rows by what precedes them: 0 nothing, 1 SOT, 2 + g the group prefix g.
      std::map<std::size_t, std::vector<std::int64_t>> members;
      for (std::int64_t i = 0; i < b; ++i) {
        const TokenizedPrompt& t = *batch.prompts[i];
        std::size_t key = 0;
        if (batch.mode == LastSubject && t.ids[0] == sot_id) {
          const auto it = L >= 3 ? group_of.find(t.ids[1]) : group_of.end();
          key = it == group_of.end() ? 1 : 2 + it->second;
        }
        members[key].push_back(i);
      }
      for (auto& [key, rows] : members) {
        if (key == 1 && L == 1) {
          runs.push_back({bi, std::move(rows), kSotInput});
          continue;
        }
        TextEncoder::Input in;
        std::int64_t skip = 0;  // ids covered by the prefix
        if (key == 1) {
          in.after = static_cast<int>(kSotInput), skip = 1;
        } else if (key >= 2) {
          in.after = static_cast<int>(kGroupInput);
          in.after_row = static_cast<std::int64_t>(key - 2), skip = 2;
        }
        const auto n = static_cast<std::int64_t>(rows.size());
        in.ids = at::empty({n, L - skip}, at::kLong);
        auto acc = in.ids.accessor<std::int64_t, 2>();
        for (std::int64_t i = 0; i < n; ++i) {
          const TokenizedPrompt& t = *batch.prompts[rows[static_cast<std::size_t>(i)]];
          // Positions past n are padding: each encoder pads with its own id (SDXL: 49407 and 0).
          for (std::int64_t j = skip; j < L; ++j) acc[i][j - skip] = j < t.n ? t.ids[j] : pad;
        }
        runs.push_back({bi, std::move(rows), inputs.size()});
        inputs.push_back(std::move(in));
      }
    }
    if (!inputs.empty()) {
      const std::vector<at::Tensor> outs = enc.forward_many(inputs);
      for (const Run& r : runs) {
        const Batch& batch = batches[r.batch];
        const at::Tensor& out = outs[r.input];
        const auto n = static_cast<std::int64_t>(r.rows.size());
        const at::Tensor o = batch.mode == AllTokens ? out
                             : r.input == kSotInput ? out.expand({n, 1, ew})
                                                    : out.narrow(1, out.size(1) - 1, 1);
        if (r.rows.size() == batch.prompts.size()) {
          outs_e[r.batch] = o;  // the whole batch in its own order
          continue;
        }
        if (!outs_e[r.batch].defined()) {
          const auto b = static_cast<std::int64_t>(batch.prompts.size());
          outs_e[r.batch] = at::empty({b, o.size(1), ew}, o.options());
        }
        outs_e[r.batch].index_copy_(0, at::tensor(r.rows, at::kLong).to(o.device()), o);
      }
    }
    for (std::size_t bi = 0; bi < batches.size(); ++bi)
      if (outs_e[bi].defined()) parts[bi].push_back(outs_e[bi]);
  }
  std::vector<at::Tensor> result;
  for (auto& p : parts) {
    at::Tensor out = p.size() == 1 ? p[0] : at::cat(p, -1);
    result.push_back(out.to(at::kCPU, options.dtype).contiguous());
  }
  return result;
}

std::vector<at::Tensor> Embedder::Impl::embed(const std::vector<Request>& requests) {
  // Unique id sequences per mode (the rows depend on nothing else), then cache look-ups.
  struct PerMode {
    std::map<std::vector<std::int32_t>, std::int64_t> index;
    std::vector<CacheKey> keys;
    std::vector<const TokenizedPrompt*> unique;
    at::Tensor res;  // [U, rows, width]
  };
  PerMode per[2];
  std::vector<std::vector<std::int64_t>> slots(requests.size());
  std::int64_t N = 0;
  for (std::size_t r = 0; r < requests.size(); ++r) {
    SPEED_CHECK(requests[r].tokens != nullptr, "embedding request {} has no prompts", r);
    const Mode mode = requests[r].all_tokens ? AllTokens : LastSubject;
    PerMode& pm = per[mode];
    const std::int64_t rows = mode == AllTokens ? kContext : 1;
    for (const TokenizedPrompt& t : *requests[r].tokens) {
      SPEED_CHECK(t.n >= 1 && t.n <= kContext, "tokenized prompt {} has {} ids, expected 1..{}",
                  slots[r].size(), t.n, kContext);
      const std::int64_t len = mode == AllTokens ? kContext : t.last_subject() + 1;
      std::vector<std::int32_t> ids(t.ids.begin(), t.ids.begin() + len);
      const auto next = static_cast<std::int64_t>(pm.unique.size());
      auto [it, fresh] = pm.index.emplace(std::move(ids), next);
      if (fresh) {
        CacheKey k;
        k.mode = mode;
        k.elem_size = static_cast<std::uint32_t>(at::elementSize(options.dtype));
        k.ids = it->first;
        k.rows = static_cast<std::uint32_t>(rows);
        k.width = static_cast<std::uint64_t>(width);
        pm.keys.push_back(std::move(k));
        pm.unique.push_back(&t);
      }
      slots[r].push_back(it->second);
      ++N;
    }
  }
  // Misses grouped by (mode, ids used).
  std::map<std::pair<int, std::int64_t>, std::vector<std::int64_t>> by_length;
  std::int64_t U = 0, found = 0;
  for (int mode = 0; mode < 2; ++mode) {
    PerMode& pm = per[mode];
    const auto n = static_cast<std::int64_t>(pm.unique.size());
    U += n;
    pm.res = at::empty({n, mode == AllTokens ? kContext : 1, width},
                       at::TensorOptions().dtype(options.dtype));
    for (std::int64_t u = 0; u < n; ++u) {
      if (cache && cache->get(pm.keys[u], pm.res[u].data_ptr())) {
        ++hits, ++found;
        continue;
      }
      if (cache) ++misses;
      by_length[{mode, static_cast<std::int64_t>(pm.keys[u].ids.size())}].push_back(u);
    }
  }

  if (!by_length.empty()) load_weights();
  // Length groups are cut into batches, and batches are packed into calls of at most
  // max_batch_tokens tokens: each call is one pass over the encoder weights.
  std::vector<Batch> call;
  std::vector<std::vector<std::int64_t>> call_members;
  std::int64_t call_tokens = 0;
  auto flush = [&] {
    if (call.empty()) return;
    const std::vector<at::Tensor> rs = run_batches(call);
    for (std::size_t bi = 0; bi < call.size(); ++bi) {
      PerMode& pm = per[call[bi].mode];
      for (std::size_t m = 0; m < call_members[bi].size(); ++m) {
        const std::int64_t u = call_members[bi][m];
        pm.res[u].copy_(rs[bi][static_cast<std::int64_t>(m)]);
        if (cache) cache->put(pm.keys[u], pm.res[u].data_ptr());
      }
    }
    call.clear(), call_members.clear(), call_tokens = 0;
  };
  for (const auto& [ml, members] : by_length) {
    const auto [mode, L] = ml;
    const PerMode& pm = per[mode];
    std::size_t s = 0;
    while (s < members.size()) {
      const std::int64_t room = std::max<std::int64_t>(1, (options.max_batch_tokens - call_tokens) / L);
      const std::size_t e = std::min(members.size(), s + static_cast<std::size_t>(room));
      Batch batch;
      batch.mode = static_cast<Mode>(mode);
      batch.length = L;
      std::vector<std::int64_t> us;
      for (std::size_t m = s; m < e; ++m) {
        batch.prompts.push_back(pm.unique[members[m]]);
        us.push_back(members[m]);
      }
      call_tokens += L * static_cast<std::int64_t>(e - s);
      call.push_back(std::move(batch));
      call_members.push_back(std::move(us));
      s = e;
      if (call_tokens >= options.max_batch_tokens) flush();
    }
  }
  flush();
  log().debug("embedded {} prompts ({} unique, {} from cache) in {} length groups", N, U, found,
              by_length.size());
  std::vector<at::Tensor> out;
  for (std::size_t r = 0; r < requests.size(); ++r) {
    const Mode mode = requests[r].all_tokens ? AllTokens : LastSubject;
    const at::Tensor& res = per[mode].res;
    bool identity = static_cast<std::int64_t>(slots[r].size()) == res.size(0);
    for (std::size_t i = 0; i < slots[r].size() && identity; ++i)
      identity = slots[r][i] == static_cast<std::int64_t>(i);
    at::Tensor o = identity ? res : res.index_select(0, at::tensor(slots[r], at::kLong));
    out.push_back(mode == AllTokens ? o : o.squeeze(1));
  }
  return out;
}

}  // namespace speed
