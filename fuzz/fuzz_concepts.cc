// libFuzzer: hostile concept files, CSV files and source specs, and the target/anchor/retain set
// built from them (SPEC §1.2, §3, §6). The input is used whole as a concept file, as a CSV file
// and as a source spec; when it contains a NUL byte, the bytes before it are the targets'
// concept file and the bytes after it the retain CSV. A speed::Error is a clean refusal; a
// crash, a hang, any other exception or a broken invariant (checked below, abort()) is a bug.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "speed/concepts.h"
#include "speed/error.h"

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

bool no_outer_space(const std::string& s) {
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; };
  return s.empty() || (!space(s.front()) && !space(s.back()));
}

std::vector<speed::ConceptEntry> concept_file(std::string_view in) {
  auto entries = speed::parse_concept_text(in, "fuzz.txt");
  require(entries.size() <= speed::kMaxConcepts);
  for (const auto& e : entries) {
    require(!e.text.empty() && e.text.size() <= speed::kMaxConceptLineBytes);
    require(e.text.find('\n') == std::string::npos && e.text.front() != '#');
    require(no_outer_space(e.text) && speed::is_valid_utf8(e.text));
    if (e.anchor) require(e.anchor->find("=>") == std::string::npos && no_outer_space(*e.anchor));
  }
  return entries;
}

std::vector<std::vector<speed::ConceptEntry>> csv_columns(std::string_view in) {
  speed::CsvTable t = speed::parse_csv(in, "fuzz.csv");
  require(!t.header.empty() && t.header.size() <= speed::kMaxCsvColumns);
  require(t.rows.size() == t.row_lines.size() && t.rows.size() < speed::kMaxConcepts);
  for (std::size_t i = 0; i < t.rows.size(); ++i) {
    require(t.rows[i].size() == t.header.size());
    require(i == 0 || t.row_lines[i] > t.row_lines[i - 1]);
  }
  std::vector<std::vector<speed::ConceptEntry>> out;
  for (std::size_t c = 0; c < t.header.size() && c < 3; ++c) {
    try {
      auto col = speed::csv_column(t, "fuzz.csv", t.header[c]);
      std::unordered_set<std::string> seen;
      for (const auto& e : col) require(seen.insert(e.text).second);  // de-duplicated
      if (!t.rows.empty()) {
        const std::string& key = t.header[t.header.size() - 1];
        auto filtered = speed::csv_column(t, "fuzz.csv", t.header[c], key, t.rows[0].back());
        require(filtered.size() <= col.size());
      }
      out.push_back(std::move(col));
    } catch (const speed::Error&) {
    }
  }
  return out;
}

void concept_set(const std::vector<speed::ConceptEntry>& targets,
                 const std::vector<std::vector<speed::ConceptEntry>>& retain) {
  speed::ConceptSet s = speed::build_concept_set(targets, {}, retain);
  require(!s.targets.empty() && s.targets.size() == s.anchors.size());
  require(s.retain.size() + s.dropped.size() == s.retain_unique && s.retain_unique <= s.retain_total);
  require(s.has_retain_source == !retain.empty());
  if (s.has_retain_source) require(!s.retain.empty());
  // The filter's promise: no kept retain text contains a target as a whole word, and every
  // dropped one does.
  std::vector<std::string> low;
  for (const auto& t : s.targets) low.push_back(speed::lower_text(t));
  auto hits = [&](const std::string& r) {
    const std::string lr = speed::lower_text(r);
    for (const auto& t : low)
      if (speed::contains_whole_word(lr, t)) return true;
    return false;
  };
  for (const auto& r : s.retain) require(!hits(r));
  for (const auto& r : s.dropped) require(hits(r));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<speed::ConceptEntry> targets;
  std::vector<std::vector<speed::ConceptEntry>> retain;
  const auto nul = in.find('\0');
  const std::string_view first = in.substr(0, nul);
  const std::string_view second = nul == std::string_view::npos ? in : in.substr(nul + 1);
  try {
    targets = concept_file(first);
  } catch (const speed::Error&) {
  }
  try {
    retain = csv_columns(second);
  } catch (const speed::Error&) {
  }
  try {
    if (!targets.empty()) concept_set(targets, retain);
  } catch (const speed::Error&) {
  }
  try {
    speed::SourceSpec spec = speed::parse_source_spec(std::string(first));
    require(!spec.path.empty());
    if (spec.column) require(!spec.column->empty());
    require(spec.where_key.has_value() == spec.where_value.has_value());
  } catch (const speed::Error&) {
  }
  // Unicode helpers on arbitrary bytes: lower-casing valid UTF-8 stays valid UTF-8.
  std::size_t bad = 0;
  if (speed::is_valid_utf8(in, &bad)) {
    const std::string low = speed::lower_text(in);
    require(speed::is_valid_utf8(low));
    if (!first.empty() && speed::is_valid_utf8(first)) {
      const std::string word = speed::lower_text(first);
      (void)speed::contains_whole_word(low, word);
    }
  } else {
    require(bad < size);
  }
  return 0;
}
