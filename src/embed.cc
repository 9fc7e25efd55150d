// Prompts -> text-encoder rows (SPEC §1.1): de-duplication, the cache, batching by length, and
// the shared SOT prefix.
//
// Last-subject mode: row j = n - 2 depends only on ids 0..j (causal attention, no padding mask),
// so prompts are grouped by j + 1 and each group runs as dense [b, j] batches after the SOT
// token, whose keys/values are computed once per call: no padding, no batching artefacts.
#include "speed/embed.h"

#include <cstdlib>
#include <filesystem>
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
  at::Tensor embed(const std::vector<TokenizedPrompt>& tokens, Mode mode);
  struct Batch {
    std::int64_t length = 0;  // ids used per prompt (the same for the whole batch)
    std::vector<const TokenizedPrompt*> prompts;
  };
  // [b, rows, width] for each batch of misses; all batches go through one pass per encoder.
  std::vector<at::Tensor> run_batches(const std::vector<Batch>& batches, Mode mode,
                                      std::vector<std::optional<TextEncoder::Prefix>>& sot);
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
  impl_->tokenizer =
      std::make_unique<ClipTokenizer>(ClipTokenizer::load(find_tokenizer(tokenizer_path, model_tok)));
  if (options.cache_dir) impl_->cache = std::make_unique<EmbedCache>(*options.cache_dir, weights_hash());
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
  return impl_->embed(tokens, Impl::LastSubject).squeeze(1);
}
at::Tensor Embedder::all_tokens(const std::vector<TokenizedPrompt>& tokens) {
  return impl_->embed(tokens, Impl::AllTokens);
}

std::vector<at::Tensor> Embedder::Impl::run_batches(const std::vector<Batch>& batches, Mode mode,
                                                    std::vector<std::optional<TextEncoder::Prefix>>& sot) {
  // Last-subject rows of prompts that share their first content token (first names, templates
  // like "a ..."): causal attention makes the [SOT, t1] rows the same for all of them, so such a
  // group's [SOT, t1] keys and values are computed once and its prompts run from position 2.
  // Only groups of kMinGroup or more (a group costs its own small attention batches).
  constexpr std::size_t kMinGroup = 4;
  std::map<std::int32_t, std::size_t> group_of;  // first content token -> group index
  std::vector<std::int32_t> group_tokens;
  if (mode == LastSubject) {
    std::map<std::int32_t, std::size_t> count;
    for (const Batch& batch : batches)
      if (batch.length >= 3)
        for (const TokenizedPrompt* t : batch.prompts) ++count[t->ids[1]];
    for (const auto& [tok, c] : count)
      if (c >= kMinGroup) group_of.emplace(tok, group_tokens.size()), group_tokens.push_back(tok);
  }
  std::vector<std::vector<at::Tensor>> parts(batches.size());
  for (std::size_t e = 0; e < encoders.size(); ++e) {
    const TextEncoder& enc = *encoders[e];
    const int pad = enc.info().pad_id;
    const std::int64_t ew = enc.info().width;
    std::vector<TextEncoder::Prefix> group_prefix;
    if (!group_tokens.empty()) {
      at::Tensor gid = at::empty({static_cast<std::int64_t>(group_tokens.size()), 2}, at::kLong);
      auto acc = gid.accessor<std::int64_t, 2>();
      const std::int32_t sot_id = batches.front().prompts.front()->ids[0];
      for (std::size_t g = 0; g < group_tokens.size(); ++g) {
        acc[static_cast<std::int64_t>(g)][0] = sot_id;
        acc[static_cast<std::int64_t>(g)][1] = group_tokens[g];
      }
      group_prefix = enc.encode_prefixes(gid);
    }
    // One forward input per (batch, group): the ids after the prefix, its prefix, and where
    // its rows go (batch, rows within the batch).
    struct Run {
      std::size_t batch;
      std::vector<std::int64_t> rows;
      const TextEncoder::Prefix* prefix;
      std::int64_t skip;  // ids covered by the prefix
    };
    std::vector<Run> runs;
    std::vector<at::Tensor> ids_list;
    std::vector<const TextEncoder::Prefix*> prefixes;
    std::vector<at::Tensor> outs_e(batches.size());
    for (std::size_t bi = 0; bi < batches.size(); ++bi) {
      const Batch& batch = batches[bi];
      const auto b = static_cast<std::int64_t>(batch.prompts.size());
      const std::int64_t L = batch.length;
      if (mode == LastSubject) {
        // Every prompt starts with SOT: its keys/values are shared by the whole call.
        if (!sot[e]) sot[e] = enc.encode_prefix(at::tensor({static_cast<std::int64_t>(batch.prompts.front()->ids[0])}, at::kLong));
        if (L == 1) {
          outs_e[bi] = sot[e]->states.expand({b, 1, ew});
          continue;
        }
      }
      std::map<std::size_t, std::vector<std::int64_t>> members;  // group (or npos) -> rows
      for (std::int64_t i = 0; i < b; ++i) {
        const auto it = L >= 3 ? group_of.find(batch.prompts[i]->ids[1]) : group_of.end();
        members[it == group_of.end() ? std::string::npos : it->second].push_back(i);
      }
      for (auto& [g, rows] : members) {
        Run r{bi, std::move(rows), nullptr, 0};
        if (mode == LastSubject) {
          r.prefix = g == std::string::npos ? &*sot[e] : &group_prefix[g];
          r.skip = r.prefix->length;
        }
        const auto n = static_cast<std::int64_t>(r.rows.size());
        at::Tensor ids = at::empty({n, L - r.skip}, at::kLong);
        auto acc = ids.accessor<std::int64_t, 2>();
        for (std::int64_t i = 0; i < n; ++i) {
          const TokenizedPrompt& t = *batch.prompts[r.rows[static_cast<std::size_t>(i)]];
          // Positions past n are padding: each encoder pads with its own id (SDXL: 49407 and 0).
          for (std::int64_t j = r.skip; j < L; ++j) acc[i][j - r.skip] = j < t.n ? t.ids[j] : pad;
        }
        ids_list.push_back(ids);
        prefixes.push_back(r.prefix);
        runs.push_back(std::move(r));
      }
    }
    if (!ids_list.empty()) {
      const std::vector<at::Tensor> outs = enc.forward_many(ids_list, prefixes);
      for (std::size_t k = 0; k < runs.size(); ++k) {
        const Run& r = runs[k];
        const std::int64_t L = batches[r.batch].length;
        const at::Tensor o = mode == AllTokens ? outs[k] : outs[k].narrow(1, L - r.skip - 1, 1);
        if (r.rows.size() == batches[r.batch].prompts.size()) {
          outs_e[r.batch] = o;  // the whole batch in its own order
          continue;
        }
        if (!outs_e[r.batch].defined()) {
          outs_e[r.batch] = at::empty({static_cast<std::int64_t>(batches[r.batch].prompts.size()),
                                       o.size(1), ew},
                                      o.options());
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

at::Tensor Embedder::Impl::embed(const std::vector<TokenizedPrompt>& tokens, Mode mode) {
  const std::int64_t rows = mode == AllTokens ? kContext : 1;
  const auto N = static_cast<std::int64_t>(tokens.size());
  at::Tensor out = at::empty({N, rows, width}, at::TensorOptions().dtype(options.dtype));
  if (N == 0) return out;

  // Unique id sequences (the rows depend on nothing else), then cache look-ups.
  std::map<std::vector<std::int32_t>, std::int64_t> index;
  std::vector<std::int64_t> slot(N);
  std::vector<CacheKey> keys;
  std::vector<const TokenizedPrompt*> unique;
  for (std::int64_t i = 0; i < N; ++i) {
    const TokenizedPrompt& t = tokens[i];
    SPEED_CHECK(t.n >= 1 && t.n <= kContext, "tokenized prompt {} has {} ids, expected 1..{}", i,
                t.n, kContext);
    const std::int64_t len = mode == AllTokens ? kContext : t.last_subject() + 1;
    std::vector<std::int32_t> ids(t.ids.begin(), t.ids.begin() + len);
    auto [it, fresh] = index.emplace(std::move(ids), static_cast<std::int64_t>(unique.size()));
    if (fresh) {
      CacheKey k;
      k.mode = mode;
      k.elem_size = static_cast<std::uint32_t>(at::elementSize(options.dtype));
      k.ids = it->first;
      k.rows = static_cast<std::uint32_t>(rows);
      k.width = static_cast<std::uint64_t>(width);
      keys.push_back(std::move(k));
      unique.push_back(&t);
    }
    slot[i] = it->second;
  }
  const auto U = static_cast<std::int64_t>(unique.size());
  at::Tensor res = at::empty({U, rows, width}, at::TensorOptions().dtype(options.dtype));
  std::map<std::int64_t, std::vector<std::int64_t>> by_length;  // misses grouped by ids used
  for (std::int64_t u = 0; u < U; ++u) {
    if (cache && cache->get(keys[u], res[u].data_ptr())) {
      ++hits;
      continue;
    }
    if (cache) ++misses;
    by_length[static_cast<std::int64_t>(keys[u].ids.size())].push_back(u);
  }

  if (!by_length.empty()) load_weights();
  std::vector<std::optional<TextEncoder::Prefix>> sot(encoders.size());
  // Length groups are cut into batches, and batches are packed into calls of at most
  // max_batch_tokens tokens: each call is one pass over the encoder weights.
  std::vector<Batch> call;
  std::vector<std::vector<std::int64_t>> call_members;
  std::int64_t call_tokens = 0;
  auto flush = [&] {
    if (call.empty()) return;
    const std::vector<at::Tensor> rs = run_batches(call, mode, sot);
    for (std::size_t bi = 0; bi < call.size(); ++bi) {
      for (std::size_t m = 0; m < call_members[bi].size(); ++m) {
        const std::int64_t u = call_members[bi][m];
        res[u].copy_(rs[bi][static_cast<std::int64_t>(m)]);
        if (cache) cache->put(keys[u], res[u].data_ptr());
      }
    }
    call.clear(), call_members.clear(), call_tokens = 0;
  };
  for (const auto& [L, members] : by_length) {
    std::size_t s = 0;
    while (s < members.size()) {
      const std::int64_t room = std::max<std::int64_t>(1, (options.max_batch_tokens - call_tokens) / L);
      const std::size_t e = std::min(members.size(), s + static_cast<std::size_t>(room));
      Batch batch;
      batch.length = L;
      std::vector<std::int64_t> us;
      for (std::size_t m = s; m < e; ++m) batch.prompts.push_back(unique[members[m]]), us.push_back(members[m]);
      call_tokens += L * static_cast<std::int64_t>(e - s);
      call.push_back(std::move(batch));
      call_members.push_back(std::move(us));
      s = e;
      if (call_tokens >= options.max_batch_tokens) flush();
    }
  }
  flush();
  log().debug("embedded {} prompts ({} unique, {} from cache) in {} length groups", N, U,
              cache ? hits : 0, by_length.size());
  if (U == N) {
    bool identity = true;
    for (std::int64_t i = 0; i < N && identity; ++i) identity = slot[i] == i;
    if (identity) return res;
  }
  return res.index_select(0, at::tensor(slot, at::kLong));
}

}  // namespace speed
