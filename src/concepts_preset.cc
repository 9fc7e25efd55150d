// Presets (SPEC §1.4, §3): JSON objects keyed by the long option names. The built-in copies are
// the files configs/<name>.json verbatim (a test checks that they stay identical), so the binary
// needs no installed data to run `--preset celebrity`.
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "concepts_internal.h"
#include "speed/concepts.h"
#include "speed/error.h"

namespace speed {
namespace {

constexpr std::size_t kMaxPresetBytes = 1u << 20;

struct Builtin {
  const char* name;
  const char* json;
};
const Builtin kBuiltins[] = {
    {"instance", R"json({
  "description": "SPEED paper, instance erasure (e.g. Snoopy; Snoopy, Mickey; Snoopy, Mickey, Spongebob): anchor \"\", retain the characters of instance.csv",
  "anchor": "",
  "retain": ["instance.csv:concept"],
  "threshold": 0.1,
  "retain-scale": 1.0,
  "lambda": 0.0
}
)json"},
    {"style", R"json({
  "description": "SPEED paper, artistic style erasure (e.g. Van Gogh; Picasso; Monet): anchor \"art\", retain the artists of style.csv",
  "anchor": "art",
  "retain": ["style.csv:concept"],
  "threshold": 0.1,
  "retain-scale": 1.0,
  "lambda": 0.0
}
)json"},
    {"celebrity", R"json({
  "description": "SPEED paper, multi-celebrity erasure: the type=erase rows of N_celebrity.csv (N = 10, 50, 100; 10 by default) become \"person\", the 100 type=retain celebrities are kept; IPF off",
  "concepts": ["10_celebrity.csv:concept:type=erase"],
  "anchor": "person",
  "retain": ["100_celebrity.csv:concept:type=retain"],
  "threshold": 1e-4,
  "retain-scale": 0.05,
  "lambda": 0.0,
  "no-filter": true
}
)json"},
    {"nudity", R"json({
  "description": "SPEED paper, implicit concept erasure: \"nudity\" in all-tokens mode becomes \"\", no retain source (the empty prompt is kept), soft invariants",
  "concept": ["nudity"],
  "anchor": "",
  "threshold": 0.1,
  "retain-scale": 0.7,
  "lambda": 0.5,
  "all-tokens": true
}
)json"},
};

const char* type_name(const nlohmann::json& v) {
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "null";
}

[[noreturn]] void wrong_type(const std::string& label, const std::string& key,
                             const nlohmann::json& v, const char* expected) {
  throw UsageError(
      fmt::format("preset '{}': key '{}' is {}, expected {}", label, key, type_name(v), expected));
}

std::vector<std::string> strings(const std::string& label, const std::string& key,
                                 const nlohmann::json& v) {
  if (v.is_string()) return {v.get<std::string>()};
  if (!v.is_array()) wrong_type(label, key, v, "a string or an array of strings");
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string()) wrong_type(label, key, e, "a string (in the array)");
    out.push_back(e.get<std::string>());
  }
  return out;
}

}  // namespace

std::vector<std::string> preset_names() {
  std::vector<std::string> out;
  for (const auto& b : kBuiltins) out.push_back(b.name);
  return out;
}

std::optional<std::string> builtin_preset_json(std::string_view name) {
  for (const auto& b : kBuiltins)
    if (name == b.name) return std::string(b.json);
  return std::nullopt;
}

Preset parse_preset(std::string_view text, const std::string& label) {
  SPEED_CHECK(text.size() <= kMaxPresetBytes, "preset '{}' is larger than {} bytes", label,
              kMaxPresetBytes);
  SPEED_CHECK(is_valid_utf8(text), "preset '{}' is not valid UTF-8", label);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw UsageError(fmt::format("preset '{}' is not valid JSON: {}", label, e.what()));
  }
  if (!j.is_object())
    throw UsageError(fmt::format("preset '{}' is {}, expected a JSON object", label, type_name(j)));
  Preset p;
  p.name = label;
  p.source = label;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
    auto num = [&](std::optional<double>& out) {
      if (!v.is_number()) wrong_type(label, k, v, "a number");
      out = v.get<double>();
    };
    auto integer = [&](std::optional<std::int64_t>& out) {
      if (!v.is_number_integer()) wrong_type(label, k, v, "an integer");
      out = v.get<std::int64_t>();
    };
    auto boolean = [&](std::optional<bool>& out) {
      if (!v.is_boolean()) wrong_type(label, k, v, "a boolean");
      out = v.get<bool>();
    };
    auto str = [&](std::optional<std::string>& out) {
      if (!v.is_string()) wrong_type(label, k, v, "a string");
      out = v.get<std::string>();
    };
    if (k == "description")
      str(p.description);
    else if (k == "concepts")
      p.concept_sources = strings(label, k, v);
    else if (k == "concept")
      p.concept_texts = strings(label, k, v);
    else if (k == "anchor")
      p.anchor = strings(label, k, v);
    else if (k == "retain")
      p.retain = strings(label, k, v);
    else if (k == "method")
      str(p.method);
    else if (k == "params")
      str(p.params);
    else if (k == "augment")
      integer(p.augment);
    else if (k == "iec-clusters")
      integer(p.iec_clusters);
    else if (k == "seed")
      integer(p.seed);
    else if (k == "threshold")
      num(p.threshold);
    else if (k == "retain-scale")
      num(p.retain_scale);
    else if (k == "lambda")
      num(p.lambda);
    else if (k == "lamb")
      num(p.lamb);
    else if (k == "erase-scale")
      num(p.erase_scale);
    else if (k == "preserve-scale")
      num(p.preserve_scale);
    else if (k == "no-filter")
      boolean(p.no_filter);
    else if (k == "no-iec")
      boolean(p.no_iec);
    else if (k == "all-tokens")
      boolean(p.all_tokens);
    else if (k == "allow-empty-null-space")
      boolean(p.allow_empty_null_space);
    else
      throw UsageError(fmt::format("preset '{}' has an unknown key '{}'", label, k),
                       "keys are the long option names: concepts, concept, anchor, retain, method, "
                       "params, augment, "
                       "threshold, retain-scale, lambda, no-filter, iec-clusters, no-iec, "
                       "all-tokens, seed, lamb, "
                       "erase-scale, preserve-scale, allow-empty-null-space, description");
  }
  if (p.seed && *p.seed < 0)
    throw UsageError(fmt::format("preset '{}': key 'seed' is {}, expected >= 0", label, *p.seed));
  return p;
}

Preset load_preset(const std::string& name) {
  struct stat st {};
  const bool is_file = ::stat(name.c_str(), &st) == 0 && S_ISREG(st.st_mode);
  const bool looks_like_file = name.size() > 5 && name.compare(name.size() - 5, 5, ".json") == 0;
  if (is_file || looks_like_file || name.find('/') != std::string::npos) {
    Preset p = parse_preset(detail::read_file_limited(name), name);
    p.source = name;
    return p;
  }
  const auto text = builtin_preset_json(name);
  if (!text)
    throw UsageError(fmt::format("unknown preset '{}', expected one of {} or a .json file", name,
                                 fmt::join(preset_names(), ", ")));
  Preset p = parse_preset(*text, name);
  p.source = "built-in";
  return p;
}

}  // namespace speed
