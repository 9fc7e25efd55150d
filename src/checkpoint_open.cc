// Opening checkpoints: single safetensors files and diffusers folders (variants, shards).
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "checkpoint_internal.h"
#include "checkpoint_layouts.h"
#include "speed/error.h"
#include "speed/log.h"

namespace speed {

namespace detail {

namespace {
bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
}  // namespace

TextEncoderInfo read_text_encoder(const SafeTensors& st, std::size_t file, const std::string& prefix,
                                  TextNaming naming) {
  const auto& n = layouts::text_naming(naming);
  TextEncoderInfo te;
  te.prefix = prefix;
  te.file = file;
  te.naming = naming;
  auto need = [&](const std::string& key, std::size_t rank) -> const TensorInfo& {
    const TensorInfo* t = st.find(key);
    SPEED_CHECK(t != nullptr, "'{}': text encoder tensor '{}' is missing", st.path(), key);
    SPEED_CHECK(t->shape.size() == rank, "'{}': tensor '{}' has shape {}, expected rank {}", st.path(), key,
                format_shape(t->shape), rank);
    return *t;
  };
  const auto& tok = need(prefix + n.token_embedding, 2);
  te.vocab = tok.shape[0];
  te.width = tok.shape[1];
  const auto& pos = need(prefix + n.position_embedding, 2);
  te.positions = pos.shape[0];
  SPEED_CHECK(pos.shape[1] == te.width, "tensor '{}' has shape {}, expected [{}, {}]", pos.name,
              format_shape(pos.shape), te.positions, te.width);
  std::set<int> layers;
  const std::string lp = prefix + n.layer_prefix;
  for (const auto& t : st.tensors()) {
    if (!starts_with(t.name, lp)) continue;
    std::string_view rest = std::string_view(t.name).substr(lp.size());
    auto dot = rest.find('.');
    auto i = layouts::parse_index(rest.substr(0, dot));
    SPEED_CHECK(i.has_value() && dot != std::string_view::npos, "'{}': unexpected text encoder tensor '{}'",
                st.path(), t.name);
    layers.insert(*i);
  }
  SPEED_CHECK(!layers.empty(), "'{}': text encoder '{}' has no layers ('{}0.*')", st.path(), prefix, lp);
  te.layers = *layers.rbegin() + 1;
  for (int i = 0; i < te.layers; ++i) {
    SPEED_CHECK(layers.count(i), "'{}': text encoder layer {} is missing ('{}{}.*'; found {} layers up to {})",
                st.path(), i, lp, i, layers.size(), te.layers - 1);
    need(fmt::format("{}{}.{}", lp, i, n.attention), 2);
  }
  const auto& fc1 = need(lp + "0." + n.fc1, 2);
  te.mlp = fc1.shape[0];
  SPEED_CHECK(fc1.shape[1] == te.width, "tensor '{}' has shape {}, expected [{}, {}]", fc1.name,
              format_shape(fc1.shape), te.mlp, te.width);
  te.heads = te.width / 64;
  if (naming == TextNaming::OpenCLIP) {
    if (st.contains(prefix + "text_projection")) te.projection_key = prefix + "text_projection";
  } else {
    // HF keeps text_projection beside text_model (CLIPTextModelWithProjection).
    std::string parent = prefix;
    if (parent.size() >= 11 && parent.compare(parent.size() - 11, 11, "text_model.") == 0) {
      parent.resize(parent.size() - 11);
    }
    if (st.contains(parent + "text_projection.weight")) te.projection_key = parent + "text_projection.weight";
  }
  te.has_projection = !te.projection_key.empty();
  return te;
}

}  // namespace detail

namespace {

using detail::FamilyVote;
using detail::FoundEncoder;

void check_heads(const TextEncoderInfo& te, const std::string& where) {
  SPEED_CHECK(te.heads > 0 && te.width % te.heads == 0,
              "{}: cannot infer attention heads for text width {} (not a multiple of 64)", where, te.width);
}

std::string read_small_file(const std::string& path, std::size_t limit) {
  std::ifstream in(path, std::ios::binary);
  SPEED_CHECK(in.good(), "cannot read '{}'", path);
  std::string s;
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    s.append(buf, static_cast<std::size_t>(in.gcount()));
    SPEED_CHECK(s.size() <= limit, "'{}' is larger than {} bytes", path, limit);
  }
  return s;
}

nlohmann::json read_json(const std::string& path) {
  std::string s = read_small_file(path, 64u << 20);
  try {
    auto j = nlohmann::json::parse(s);
    SPEED_CHECK(j.is_object(), "'{}' is a JSON {}, expected an object", path, j.type_name());
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail("'{}' is not valid JSON: {}", path, e.what());
  }
}

bool starts_with_s(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

bool is_dir(const std::string& p) {
  struct stat sb {};
  return ::stat(p.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode);
}
bool is_file(const std::string& p) {
  struct stat sb {};
  return ::stat(p.c_str(), &sb) == 0 && S_ISREG(sb.st_mode);
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) out.emplace_back(e->d_name);
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

std::size_t add_file(Checkpoint& ck, const std::string& path, const std::string& role) {
  ck.files.push_back({path, role, std::make_shared<const SafeTensors>(SafeTensors::open(path))});
  return ck.files.size() - 1;
}

// Single-file text encoders, by the spellings table.
std::vector<FoundEncoder> find_single_file_encoders(const SafeTensors& st, std::size_t file) {
  std::vector<FoundEncoder> out;
  for (const auto& sp : layouts::kTextEncoderSpellings) {
    const auto& n = layouts::text_naming(sp.naming);
    if (!st.contains(std::string(sp.prefix) + n.token_embedding)) continue;
    FoundEncoder e;
    e.info = detail::read_text_encoder(st, file, sp.prefix, sp.naming);
    e.slot = sp.slot;
    e.family = sp.family;
    e.what = sp.what;
    check_heads(e.info, fmt::format("'{}'", st.path()));
    for (const auto& o : out) {
      SPEED_CHECK(o.slot != e.slot, "'{}' has two text encoders for slot {}: '{}' and '{}'", st.path(), e.slot,
                  o.info.prefix, e.info.prefix);
    }
    out.push_back(std::move(e));
  }
  return out;
}

// diffusers weight file in `dir` named `stem`: plain, then the preferred variant, then any.
struct WeightChoice {
  std::string file;   // a .safetensors file, or
  std::string index;  // a sharded index
  std::string variant;
};

std::optional<WeightChoice> choose_weights(const std::string& dir, const std::string& stem,
                                           const std::string& prefer_variant) {
  std::map<std::string, WeightChoice> found;  // variant -> choice
  const std::string plain = stem + ".safetensors";
  const std::string index = stem + ".safetensors.index.json";
  const std::string index_v = stem + ".safetensors.index.";
  for (const auto& name : list_dir(dir)) {
    std::string variant;
    bool is_index = false;
    if (name == plain) {
    } else if (name == index) {
      is_index = true;
    } else if (starts_with_s(name, stem + ".") && name.size() > plain.size() + 1 &&
               name.compare(name.size() - 12, 12, ".safetensors") == 0 && !starts_with_s(name, index_v)) {
      variant = name.substr(stem.size() + 1, name.size() - stem.size() - 1 - 12);
    } else if (starts_with_s(name, index_v) && name.size() > index_v.size() + 5 &&
               name.compare(name.size() - 5, 5, ".json") == 0) {
      variant = name.substr(index_v.size(), name.size() - index_v.size() - 5);
      is_index = true;
    } else {
      continue;
    }
    // Shards ("<stem>.fp16-00001-of-00002.safetensors") are reached through their index.
    if (variant.find_first_of("./") != std::string::npos || variant.find("-of-") != std::string::npos) continue;
    if (!is_file(dir + "/" + name)) continue;
    auto& c = found[variant];
    c.variant = variant;
    if (is_index) {
      c.index = dir + "/" + name;
    } else {
      c.file = dir + "/" + name;
    }
  }
  if (found.empty()) return std::nullopt;
  for (const std::string& v : {std::string(), prefer_variant}) {
    auto it = found.find(v);
    if (it != found.end()) return it->second;
  }
  return found.begin()->second;
}

std::vector<std::size_t> open_unet(Checkpoint& ck, const std::string& dir) {
  auto choice = choose_weights(dir, "diffusion_pytorch_model", "fp16");
  if (!choice) {
    bool bin = false;
    for (const auto& n : list_dir(dir)) bin = bin || n.find(".bin") != std::string::npos;
    fail_hint(bin ? "convert the UNet to safetensors (diffusers: save_pretrained(safe_serialization=True))" : "",
              "'{}' has no diffusion_pytorch_model[.<variant>].safetensors", dir);
  }
  ck.variant = choice->variant;
  std::vector<std::size_t> files;
  if (!choice->file.empty()) {
    if (!choice->index.empty()) log().info("'{}': using '{}', ignoring the index", dir, choice->file);
    files.push_back(add_file(ck, choice->file, "unet"));
    return files;
  }
  ck.unet_index = choice->index;
  auto j = read_json(choice->index);
  auto wm = j.find("weight_map");
  SPEED_CHECK(wm != j.end() && wm->is_object(), "'{}' has no \"weight_map\" object", choice->index);
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    SPEED_CHECK(it->is_string(), "'{}': weight_map entry '{}' is not a file name", choice->index, it.key());
    const auto& shard = it->get_ref<const std::string&>();
    SPEED_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..",
                "'{}': shard name '{}' for tensor '{}' is not a plain file name", choice->index, shard, it.key());
    by_shard[shard].push_back(it.key());
  }
  SPEED_CHECK(!by_shard.empty(), "'{}' lists no tensors", choice->index);
  for (const auto& [shard, names] : by_shard) {
    std::size_t f = add_file(ck, dir + "/" + shard, "unet");
    const SafeTensors& st = ck.file(f);
    SPEED_CHECK(st.tensors().size() == names.size(), "'{}' has {} tensors, the index '{}' maps {} to it",
                st.path(), st.tensors().size(), choice->index, names.size());
    for (const auto& n : names) {
      SPEED_CHECK(st.contains(n), "'{}' maps tensor '{}' to '{}', which does not have it", choice->index, n, st.path());
    }
    files.push_back(f);
  }
  return files;
}

void read_encoder_config(FoundEncoder& e, const std::string& path) {
  auto j = read_json(path);
  e.info.config_path = path;
  auto num = [&](const char* key, std::int64_t have) {
    auto it = j.find(key);
    if (it == j.end()) return;
    SPEED_CHECK(it->is_number_integer(), "'{}': \"{}\" is not an integer", path, key);
    SPEED_CHECK(it->get<std::int64_t>() == have, "'{}' says {} {}, the weights have {}", path, key,
                it->get<std::int64_t>(), have);
  };
  num("hidden_size", e.info.width);
  num("num_hidden_layers", e.info.layers);
  num("intermediate_size", e.info.mlp);
  num("vocab_size", e.info.vocab);
  num("max_position_embeddings", e.info.positions);
  auto heads = j.find("num_attention_heads");
  if (heads != j.end()) {
    SPEED_CHECK(heads->is_number_integer() && heads->get<std::int64_t>() > 0 &&
                    e.info.width % heads->get<std::int64_t>() == 0,
                "'{}': num_attention_heads {} does not divide hidden_size {}", path, heads->dump(), e.info.width);
    e.info.heads = heads->get<std::int64_t>();
  }
  auto act = j.find("hidden_act");
  if (act != j.end()) {
    SPEED_CHECK(act->is_string(), "'{}': hidden_act is not a string", path);
    const auto& a = act->get_ref<const std::string&>();
    if (a == "quick_gelu") {
      e.info.activation = Activation::QuickGELU;
      if (e.slot == 0) e.config_family = {Family::SD1, Family::SDXL};
    } else if (a == "gelu") {
      e.info.activation = Activation::GELU;
      if (e.slot == 0) e.config_family = {Family::SD2};
    } else {
      fail("'{}': hidden_act '{}' is not supported (expected quick_gelu or gelu)", path, a);
    }
    e.activation_from_config = true;
    e.config_clue = fmt::format("text encoder config hidden_act {}", a);
  }
}

Checkpoint open_diffusers(const std::string& dir) {
  Checkpoint ck;
  ck.path = dir;
  ck.layout = Layout::Diffusers;
  FamilyVote vote;
  vote.path = dir;
  const std::string unet = dir + "/unet";
  SPEED_CHECK(is_dir(unet), "'{}' is a folder without a unet/ subfolder (not a diffusers pipeline)", dir);
  auto unet_files = open_unet(ck, unet);
  detail::collect_unet(ck, unet_files, vote);
  SPEED_CHECK(ck.unet_naming == "diffusers", "'{}' uses LDM names ('{}'), expected diffusers UNet names",
              ck.file(unet_files.front()).path(), ck.kv.front().source);

  std::vector<FoundEncoder> encoders;
  const char* subdirs[] = {"text_encoder", "text_encoder_2"};
  const char* tokenizers[] = {"tokenizer", "tokenizer_2"};
  for (int slot = 0; slot < 2; ++slot) {
    const std::string td = dir + "/" + subdirs[slot];
    if (!is_dir(td)) continue;
    auto choice = choose_weights(td, "model", ck.variant.empty() ? "fp16" : ck.variant);
    SPEED_CHECK(choice.has_value(), "'{}' has no model[.<variant>].safetensors", td);
    SPEED_CHECK(!choice->file.empty(), "'{}': sharded text encoders are not supported ('{}')", td, choice->index);
    std::size_t f = add_file(ck, choice->file, subdirs[slot]);
    FoundEncoder e;
    e.slot = slot;
    e.what = fmt::format("diffusers {}", subdirs[slot]);
    const SafeTensors& st = ck.file(f);
    if (st.contains("text_model.embeddings.token_embedding.weight")) {
      e.info = detail::read_text_encoder(st, f, "text_model.", TextNaming::HF);
    } else {
      fail("'{}' has no 'text_model.embeddings.token_embedding.weight' (not a CLIPTextModel)", st.path());
    }
    if (slot == 1) {
      e.config_family = {Family::SDXL};
      e.config_clue = "a text_encoder_2/ folder (SDXL)";
    }
    const std::string cfg = td + "/config.json";
    if (is_file(cfg)) {
      auto keep = e.config_family;
      auto keep_clue = e.config_clue;
      read_encoder_config(e, cfg);
      if (slot == 1) {
        e.config_family = keep;
        e.config_clue = keep_clue;
      }
    }
    check_heads(e.info, fmt::format("'{}'", st.path()));
    const std::string tok = dir + "/" + tokenizers[slot];
    if (is_dir(tok)) e.info.tokenizer_dir = tok;
    encoders.push_back(std::move(e));
  }
  if (is_dir(dir + "/tokenizer")) ck.tokenizer_dir = dir + "/tokenizer";
  detail::finish(ck, encoders, vote);
  return ck;
}

}  // namespace

Checkpoint detect_checkpoint(std::shared_ptr<const SafeTensors> st, const std::string& path) {
  Checkpoint ck;
  ck.path = path;
  ck.files.push_back({st->path(), "checkpoint", st});
  FamilyVote vote;
  vote.path = path;
  detail::collect_unet(ck, {0}, vote);
  auto encoders = find_single_file_encoders(*st, 0);
  ck.layout = encoders.empty() ? Layout::UNetOnly : Layout::SingleFile;
  if (ck.layout == Layout::UNetOnly) ck.files[0].role = "unet";
  detail::collect_ema(ck);
  detail::finish(ck, encoders, vote);
  return ck;
}

Checkpoint open_checkpoint(const std::string& path) {
  struct stat sb {};
  if (::stat(path.c_str(), &sb) != 0) {
    int err = errno;
    fail_hint("check the --model path", "cannot open '{}': {}", path, std::strerror(err));
  }
  if (S_ISDIR(sb.st_mode)) return open_diffusers(path);
  auto st = std::make_shared<const SafeTensors>(SafeTensors::open(path));
  return detect_checkpoint(std::move(st), path);
}

}  // namespace speed
