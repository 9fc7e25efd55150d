// erase: all 9 cases of edits_tiny.json from float32 text-encoder rows. The rows come from the
// built CLI (`speed-erase encode`, the SPEC §3 contract), so this test needs no other library; the
// retain texts are the CSV column's unique values minus the golden's dropped_texts (the target
// filter itself is tested against the same golden in test_concepts).
#include <ATen/ATen.h>

#include <chrono>
#include <cstdlib>
#include <set>
#include <unordered_set>

#include "test_erase_util.h"

#include <catch2/catch.hpp>

using namespace speed;
using erase_test::edits_json;

namespace {

// Unique values of one column of a well-formed RFC 4180 file (the paper's data files).
std::vector<std::string> csv_unique(const std::string& path, const std::string& column) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string s = ss.str();
  std::vector<std::vector<std::string>> rows(1);
  std::string field;
  bool quoted = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (quoted) {
      if (c == '"' && i + 1 < s.size() && s[i + 1] == '"')
        field += '"', ++i;
      else if (c == '"')
        quoted = false;
      else
        field += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      rows.back().push_back(field), field.clear();
    } else if (c == '\n') {
      rows.back().push_back(field), field.clear();
      rows.emplace_back();
    } else if (c != '\r') {
      field += c;
    }
  }
  if (!field.empty() || !rows.back().empty()) rows.back().push_back(field);
  if (rows.back().empty()) rows.pop_back();
  std::size_t col = 0;
  while (rows[0].at(col) != column) ++col;
  std::vector<std::string> out;
  std::unordered_set<std::string> seen;
  for (std::size_t r = 1; r < rows.size(); ++r)
    if (seen.insert(rows[r].at(col)).second) out.push_back(rows[r][col]);
  return out;
}

struct Encoded {
  at::Tensor hidden;  // [N, 77, d] float32
  at::Tensor last;    // [N] int64
};

Encoded encode(const std::vector<std::string>& prompts) {
  const std::string dir = SPEED_BINARY_DIR;
  const std::string in = dir + "/test_erase_golden_prompts.txt",
                    out = dir + "/test_erase_golden_states.safetensors";
  {
    std::ofstream f(in, std::ios::binary);
    for (const auto& p : prompts) f << p << "\n";
  }
  std::remove(out.c_str());
  const std::string cmd = fmt::format(
      "'{}' encode -q --model '{}' --tokenizer '{}/data/clip/bpe_simple_vocab_16e6.txt.gz' "
      "--prompts '{}' "
      "--output '{}'",
      SPEED_ERASE_BIN, erase_test::golden("fixture_tiny_f32.safetensors"), SPEED_SHARED_DIR, in,
      out);
  INFO("the golden erase test needs the CLI: " << cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  const auto st = std::make_shared<const SafeTensors>(SafeTensors::open(out));
  Encoded e;
  e.hidden = load_tensor(st, st->at("hidden_states"), at::kFloat).clone();
  e.last = load_tensor(st, st->at("last_subject_index"), at::kLong).clone();
  REQUIRE(e.hidden.size(0) == static_cast<std::int64_t>(prompts.size()));
  return e;
}

}  // namespace

TEST_CASE("all edits_tiny cases from float32 encoder rows", "[golden]") {
  const auto& cases = edits_json().at("cases");
  // One encode call for every text of every case: targets, anchors, retain texts, "".
  std::vector<std::string> prompts = {""};
  std::map<std::string, std::int64_t> row;
  auto add = [&](const std::string& p) {
    if (row.emplace(p, static_cast<std::int64_t>(prompts.size())).second) prompts.push_back(p);
  };
  row[""] = 0;
  std::map<std::string, std::vector<std::string>> retain;  // case -> texts
  for (auto it = cases.begin(); it != cases.end(); ++it) {
    const auto& c = it.value();
    for (const auto& t : c.at("targets")) add(t.get<std::string>());
    for (const auto& a : c.at("anchors")) add(a.get<std::string>());
    const std::string src = c.at("retain_source").get<std::string>();
    if (src.rfind("none", 0) == 0) continue;
    const auto colon = src.rfind(':');
    const std::string file = std::string(SPEED_SHARED_DIR) + "/data/speed/" +
                             src.substr(src.rfind('/') + 1, colon - src.rfind('/') - 1);
    const auto dropped = c.at("retain").at("dropped_texts").get<std::set<std::string>>();
    auto& texts = retain[it.key()];
    for (const auto& t : csv_unique(file, src.substr(colon + 1)))
      if (!dropped.count(t)) texts.push_back(t), add(t);
    REQUIRE(texts.size() == c.at("retain").at("kept").get<std::size_t>());
  }
  const Encoded enc = encode(prompts);
  auto last_rows = [&](const std::vector<std::string>& ps) {
    std::vector<at::Tensor> rows;
    for (const auto& p : ps) {
      const std::int64_t r = row.at(p);
      rows.push_back(enc.hidden[r][enc.last[r].item<std::int64_t>()]);
    }
    return at::stack(rows);
  };
  auto all_rows = [&](const std::vector<std::string>& ps) {
    std::vector<at::Tensor> rows;
    for (const auto& p : ps) rows.push_back(enc.hidden[row.at(p)].slice(0, 1, 77));
    return at::stack(rows);
  };
  // The encoder's empty prompt agrees with the golden's float64 states to float32 precision.
  const at::Tensor empty64 = erase_test::load(erase_test::edits_st(), "empty_prompt/hidden_states");
  CHECK((enc.hidden[0].to(at::kDouble) - empty64).abs().max().item<double>() < 4e-5);

  for (auto it = cases.begin(); it != cases.end(); ++it) {
    const auto& c = it.value();
    const EraseOptions o = erase_test::case_options(c);
    const auto targets = c.at("targets").get<std::vector<std::string>>();
    auto anchors = c.at("anchors").get<std::vector<std::string>>();
    if (anchors.size() == 1) anchors.assign(targets.size(), anchors[0]);
    EmbeddingSets sets;
    sets.targets = o.all_tokens ? all_rows(targets) : last_rows(targets);
    sets.anchors = o.all_tokens ? all_rows(anchors) : last_rows(anchors);
    if (retain.count(it.key())) sets.retain = last_rows(retain.at(it.key()));
    sets.empty = enc.hidden[0];
    const auto layers = erase_test::case_layers(c);
    const auto t0 = std::chrono::steady_clock::now();
    const EditResult r = edit_layers(sets, layers, o);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto worst = erase_test::check_case(it.key(), c, r, layers);
    WARN(it.key() << ": worst stored-layer |dW - dW_golden|/|dW_golden| " << worst.first
                  << ", worst |dW| rel. error " << worst.second << " (golden measured f32 states: "
                  << c.at("measured").at("max_rel_dW_f32emb_f64math").get<double>()
                  << "); 32 layers in " << secs << " s");
    if (o.augment >
        0) {  // the DPA path on real data: thread count and seed do not change the bytes / ΔW
      EraseOptions o2 = o;
      o2.threads = o.threads == 1 ? 2 : 1;
      const EditResult r2 = edit_layers(sets, layers, o2);
      for (std::size_t i = 0; i < r.layers.size(); ++i) {
        CHECK(at::equal(r.layers[i].delta, r2.layers[i].delta));
        CHECK(r.layers[i].diag.rows_used == r2.layers[i].diag.rows_used);
        CHECK(r.layers[i].diag.rows_used > 110);
      }
    }
  }
}
