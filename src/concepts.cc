// Concept files, CSV columns, source specs and the target/anchor/retain set (SPEC §1.2, §1.7).
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <unordered_map>
#include <unordered_set>

#include "concepts_internal.h"
#include "speed/concepts.h"
#include "speed/error.h"
#include "speed/log.h"

namespace speed {
namespace {

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string_view trim(std::string_view s) {
  const char* ws = " \t\r\n\f\v";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

std::size_t line_of(std::string_view data, std::size_t offset) {
  return 1 + static_cast<std::size_t>(std::count(data.begin(), data.begin() + offset, '\n'));
}

// A concept or CSV file: UTF-8, and no NUL byte (valid UTF-8 that no text holds: a UTF-16 file,
// or binary data).
void check_text_file(std::string_view data, const std::string& label) {
  check_utf8(data, label);
  if (const std::size_t off = data.find('\0'); off != std::string_view::npos) {
    throw Error(fmt::format("file '{}' line {} holds a NUL byte (byte offset {})", label,
                            line_of(data, off), off),
                "save the file as UTF-8 text (UTF-16 has NUL bytes)");
  }
}

std::string_view strip_bom(std::string_view data) {
  return data.substr(0, 3) == "\xEF\xBB\xBF" ? data.substr(3) : data;
}

bool ends_with_ci(std::string_view s, std::string_view suffix) {
  if (s.size() < suffix.size()) return false;
  for (std::size_t i = 0; i < suffix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - suffix.size() + i])) != suffix[i])
      return false;
  return true;
}

}  // namespace

SourceSpec parse_source_spec(const std::string& spec, bool (*exists)(const std::string&)) {
  if (!exists) exists = file_exists;
  SourceSpec s;
  s.spec = spec;
  SPEED_CHECK(!spec.empty(), "empty source: expected FILE or FILE.csv:COLUMN");
  if (exists(spec)) {
    s.path = spec;
    return s;
  }
  std::string head = spec;
  auto split_last = [](std::string& h) -> std::optional<std::string> {
    const auto c = h.rfind(':');
    if (c == std::string::npos) return std::nullopt;
    std::string tail = h.substr(c + 1);
    h.resize(c);
    return tail;
  };
  auto tail = split_last(head);
  if (!tail) {
    s.path = spec;
    return s;
  }
  if (const auto eq = tail->find('='); eq != std::string::npos) {
    s.where_key = tail->substr(0, eq);
    s.where_value = tail->substr(eq + 1);
    if (s.where_key->empty())
      throw UsageError(fmt::format(
          "source '{}': the row filter '{}' has no column name, expected KEY=VALUE", spec, *tail));
    tail = split_last(head);
    if (!tail)
      throw UsageError(
          fmt::format("source '{}': a row filter needs FILE.csv:COLUMN:KEY=VALUE", spec));
  }
  s.column = *tail;
  s.path = head;
  if (s.column->empty())
    throw UsageError(fmt::format("source '{}' has an empty column name", spec));
  if (s.path.empty())  // found by fuzz_concepts: ":concept" would open ''
    throw UsageError(fmt::format("source '{}' has no file name before ':{}'", spec, *s.column));
  return s;
}

std::vector<ConceptEntry> parse_concept_text(std::string_view data, const std::string& label) {
  check_text_file(data, label);
  data = strip_bom(data);
  std::vector<ConceptEntry> out;
  std::size_t line_no = 0;
  while (!data.empty()) {
    ++line_no;
    const auto nl = data.find('\n');
    std::string_view line = data.substr(0, nl);
    data = nl == std::string_view::npos ? std::string_view{} : data.substr(nl + 1);
    if (line.size() > kMaxConceptLineBytes)
      fail("file '{}' line {} is {} bytes long, the limit is {}", label, line_no, line.size(),
           kMaxConceptLineBytes);
    line = trim(line);
    if (line.empty() || line.front() == '#') continue;
    ConceptEntry e;
    e.origin = fmt::format("file '{}' line {}", label, line_no);
    if (const auto arrow = line.find("=>"); arrow != std::string_view::npos) {
      e.text = std::string(trim(line.substr(0, arrow)));
      e.anchor = std::string(trim(line.substr(arrow + 2)));
      SPEED_CHECK(e.anchor->find("=>") == std::string::npos,
                  "file '{}' line {} has more than one '=>'", label, line_no);
    } else {
      e.text = std::string(line);
    }
    SPEED_CHECK(!e.text.empty(), "file '{}' line {} has an anchor but no target before '=>'", label,
                line_no);
    SPEED_CHECK(out.size() < kMaxConcepts, "file '{}' has more than {} concepts", label,
                kMaxConcepts);
    out.push_back(std::move(e));
  }
  return out;
}

CsvTable parse_csv(std::string_view data, const std::string& label) {
  check_text_file(data, label);
  data = strip_bom(data);
  CsvTable t;
  std::size_t i = 0, line = 1;
  std::vector<std::string> row;
  std::string field;
  // One record at a time; a quoted field may span lines.
  while (i < data.size()) {
    const std::size_t rec_line = line, rec_start = i;
    row.clear();
    bool end_of_record = false;
    while (!end_of_record) {
      field.clear();
      if (i < data.size() && data[i] == '"') {
        ++i;
        for (;;) {
          if (i >= data.size())
            fail("file '{}' line {}: a quoted field is not closed", label, rec_line);
          const char c = data[i++];
          if (c == '"') {
            if (i < data.size() && data[i] == '"') {
              field += '"';
              ++i;
            } else {
              break;
            }
          } else {
            line += c == '\n';
            field += c;
          }
        }
        if (i < data.size() && data[i] != ',' && data[i] != '\n' && data[i] != '\r')
          fail("file '{}' line {}: unexpected character after a closing quote", label, line);
      } else {
        while (i < data.size() && data[i] != ',' && data[i] != '\n' && data[i] != '\r') {
          if (data[i] == '"')
            fail("file '{}' line {}: a quote inside an unquoted field", label, line);
          field += data[i++];
        }
      }
      if (i - rec_start > kMaxConceptLineBytes)
        fail("file '{}' line {}: the record is longer than the limit of {} bytes", label, rec_line,
             kMaxConceptLineBytes);
      row.push_back(field);
      if (row.size() > kMaxCsvColumns)
        fail("file '{}' line {} has more than {} fields", label, rec_line, kMaxCsvColumns);
      if (i < data.size() && data[i] == ',') {
        ++i;
        continue;
      }
      if (i < data.size() && data[i] == '\r') ++i;
      if (i < data.size() && data[i] == '\n') ++i;
      ++line;
      end_of_record = true;
    }
    if (t.header.empty()) {
      t.header = row;
      std::unordered_set<std::string> seen;
      for (const auto& h : t.header)
        SPEED_CHECK(seen.insert(h).second, "file '{}': the header names column '{}' twice", label,
                    h);
      continue;
    }
    if (row.size() == 1 && row[0].empty()) continue;  // a blank line
    if (row.size() != t.header.size())
      fail("file '{}' line {} has {} fields, expected {} (as the header)", label, rec_line,
           row.size(), t.header.size());
    SPEED_CHECK(t.rows.size() < kMaxConcepts, "file '{}' has more than {} rows", label,
                kMaxConcepts);
    t.rows.push_back(row);
    t.row_lines.push_back(rec_line);
  }
  SPEED_CHECK(!t.header.empty(), "file '{}' is empty, expected a CSV header row", label);
  return t;
}

std::vector<ConceptEntry> csv_column(const CsvTable& t, const std::string& label,
                                     const std::string& column,
                                     const std::optional<std::string>& where_key,
                                     const std::optional<std::string>& where_value,
                                     std::size_t* duplicates) {
  auto index_of = [&](const std::string& name) {
    for (std::size_t c = 0; c < t.header.size(); ++c)
      if (t.header[c] == name) return c;
    throw UsageError(fmt::format("file '{}' has no column '{}' (columns: {})", label, name,
                                 fmt::join(t.header, ", ")));
  };
  const std::size_t col = index_of(column);
  const std::size_t key = where_key ? index_of(*where_key) : 0;
  std::vector<ConceptEntry> out;
  std::unordered_set<std::string> seen;
  for (std::size_t r = 0; r < t.rows.size(); ++r) {
    if (where_key && t.rows[r][key] != where_value.value_or("")) continue;
    const std::string& v = t.rows[r][col];
    if (!seen.insert(v).second) {
      if (duplicates) ++*duplicates;
      continue;
    }
    out.push_back({v, std::nullopt,
                   fmt::format("file '{}' column '{}' line {}", label, column, t.row_lines[r])});
  }
  return out;
}

std::string resolve_data_path(const std::string& path, const std::optional<std::string>& data_dir) {
  if (path.empty() || path.front() == '/' || file_exists(path)) return path;
  std::optional<std::string> dir = data_dir;
  if (!dir)
    if (const char* env = std::getenv("SPEED_ERASE_DATA"); env && *env) dir = env;
  if (dir) {
    std::string candidate = *dir + (dir->back() == '/' ? "" : "/") + path;
    if (file_exists(candidate)) return candidate;
  }
  return path;
}

std::vector<ConceptEntry> read_source(const std::string& spec_text,
                                      const std::optional<std::string>& data_dir,
                                      std::size_t* duplicates) {
  // The whole spec may itself name a file (paths may contain ':'), also inside the data dir.
  const std::string whole = resolve_data_path(spec_text, data_dir);
  SourceSpec spec = parse_source_spec(whole);
  if (!spec.column) {
    const std::string data = detail::read_file_limited(spec.path);
    if (ends_with_ci(spec.path, ".csv")) {
      const CsvTable t = parse_csv(data, spec.path);
      for (const auto& h : t.header)
        if (h == "concept")
          return csv_column(t, spec.path, "concept", std::nullopt, std::nullopt, duplicates);
      throw UsageError(fmt::format("csv file '{}' needs a column: '{}:COLUMN' (columns: {})",
                                   spec.path, spec.path, fmt::join(t.header, ", ")));
    }
    return parse_concept_text(data, spec.path);
  }
  spec.path = resolve_data_path(spec.path, data_dir);
  const std::string data = detail::read_file_limited(spec.path);
  return csv_column(parse_csv(data, spec.path), spec.path, *spec.column, spec.where_key,
                    spec.where_value, duplicates);
}

void check_utf8(std::string_view data, const std::string& label) {
  std::size_t off = 0;
  if (is_valid_utf8(data, &off)) return;
  throw Error(fmt::format("file '{}' line {} is not valid UTF-8 (byte offset {})", label,
                          line_of(data, off), off),
              "save the file as UTF-8");
}

std::string source_file(const std::string& spec_text, const std::optional<std::string>& data_dir) {
  try {
    const SourceSpec spec = parse_source_spec(resolve_data_path(spec_text, data_dir));
    return spec.column ? resolve_data_path(spec.path, data_dir) : spec.path;
  } catch (const Error&) {
    return {};
  }
}

std::vector<std::string> source_files(const ConceptInputs& inputs) {
  std::vector<std::string> out;
  for (const auto* list : {&inputs.concept_sources, &inputs.retain_sources}) {
    for (const std::string& spec : *list) {
      std::string f = source_file(spec, inputs.data_dir);
      if (!f.empty()) out.push_back(std::move(f));
    }
  }
  return out;
}

ConceptSet build_concept_set(const std::vector<ConceptEntry>& targets,
                             const std::vector<std::string>& anchors,
                             const std::vector<std::vector<ConceptEntry>>& retain_sources) {
  ConceptSet s;
  if (targets.empty())
    throw UsageError("no target concept",
                     "give --concepts FILE, --concept TEXT or a preset with targets");
  if (targets.size() > kMaxConcepts)
    fail("{} target concepts, the limit is {}", targets.size(), kMaxConcepts);
  std::unordered_map<std::string, std::size_t> seen;  // lower-cased: the tokenizer lower-cases
  bool per_line = false;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    const auto& t = targets[i];
    if (std::string_view(t.text).find_first_not_of(" \t\r\n\f\v") == std::string_view::npos)
      throw UsageError(fmt::format("empty target concept ({})", t.origin));
    SPEED_CHECK(is_valid_utf8(t.text), "target concept from {} is not valid UTF-8", t.origin);
    const auto [it, fresh] = seen.emplace(lower_text(t.text), i);
    if (!fresh)
      throw UsageError(fmt::format("target '{}' ({}) repeats target '{}' ({})", t.text, t.origin,
                                   targets[it->second].text, targets[it->second].origin),
                       "each concept may be erased once; remove the duplicate");
    per_line |= t.anchor.has_value();
    s.targets.push_back(t.text);
  }
  const std::size_t n = targets.size();
  if (anchors.size() > 1 && anchors.size() != n)
    throw UsageError(
        fmt::format("{} anchors for {} targets, expected 1 or {}", anchors.size(), n, n),
        "give one --anchor for all targets or one per target, in order");
  if (anchors.size() > 1 && per_line)
    throw UsageError(
        "anchors are given both per line ('target => anchor') and as a list of --anchor",
        "use one way: per-line anchors with at most one --anchor for the other targets");
  for (std::size_t i = 0; i < n; ++i) {
    if (targets[i].anchor)
      s.anchors.push_back(*targets[i].anchor);
    else if (anchors.size() == n)
      s.anchors.push_back(anchors[i]);
    else
      s.anchors.push_back(anchors.empty() ? std::string() : anchors[0]);
    SPEED_CHECK(is_valid_utf8(s.anchors.back()), "anchor of target '{}' is not valid UTF-8",
                s.targets[i]);
  }

  s.has_retain_source = !retain_sources.empty();
  std::unordered_set<std::string> unique;
  std::vector<std::string> lowered_targets;
  for (const auto& t : s.targets) lowered_targets.push_back(lower_text(t));
  std::size_t whitespace_twins = 0;
  std::unordered_set<std::string> trimmed;
  for (const auto& src : retain_sources) {
    for (const auto& e : src) {
      ++s.retain_total;
      SPEED_CHECK(s.retain_total <= kMaxConcepts, "more than {} retain texts", kMaxConcepts);
      if (!unique.insert(e.text).second) continue;
      ++s.retain_unique;
      if (!trimmed.insert(std::string(trim(e.text))).second) ++whitespace_twins;
      const std::string low = lower_text(e.text);
      bool hit = false;
      for (const auto& t : lowered_targets)
        if (contains_whole_word(low, t)) {
          hit = true;
          break;
        }
      (hit ? s.dropped : s.retain).push_back(e.text);
    }
  }
  if (s.has_retain_source) {
    SPEED_CHECK(s.retain_unique > 0, "the retain sources have no texts");
    if (s.retain.empty())
      throw Error(
          fmt::format("every one of the {} retain texts contains a target as a whole word; "
                      "the retain set is empty",
                      s.retain_unique),
          "give retain texts that do not mention the targets, or no --retain (the empty prompt)");
    if (s.retain_total != s.retain_unique)
      s.notes.push_back(fmt::format("retain: {} duplicate texts removed ({} read, {} unique)",
                                    s.retain_total - s.retain_unique, s.retain_total,
                                    s.retain_unique));
    if (whitespace_twins)
      s.notes.push_back(
          fmt::format("retain: {} texts differ from another only in surrounding whitespace "
                      "(kept, as the reference does)",
                      whitespace_twins));
    if (!s.dropped.empty())
      s.notes.push_back(
          fmt::format("retain: {} texts containing a target were removed", s.dropped.size()));
  } else {
    s.notes.push_back("no retain source: R is the empty prompt (rows 1..76)");
  }
  return s;
}

ConceptSet load_concepts(const ConceptInputs& in) {
  std::vector<ConceptEntry> targets;
  for (const auto& src : in.concept_sources) {
    auto entries = read_source(src, in.data_dir);
    SPEED_CHECK(!entries.empty(), "concept source '{}' has no concepts", src);
    targets.insert(targets.end(), entries.begin(), entries.end());
  }
  for (const auto& c : in.concept_texts) targets.push_back({c, std::nullopt, "--concept"});
  std::vector<std::vector<ConceptEntry>> retain;
  std::size_t csv_duplicates = 0;  // repeated values inside one CSV column, collapsed on reading
  for (const auto& src : in.retain_sources) {
    retain.push_back(read_source(src, in.data_dir, &csv_duplicates));
    SPEED_CHECK(!retain.back().empty(), "retain source '{}' has no texts", src);
  }
  ConceptSet s = build_concept_set(targets, in.anchors, retain);
  if (csv_duplicates > 0) {
    const std::size_t across = s.retain_total - s.retain_unique;
    s.retain_total += csv_duplicates;
    auto it = std::find_if(s.notes.begin(), s.notes.end(), [](const std::string& n) {
      return n.find("duplicate texts") != std::string::npos;
    });
    const std::string note = fmt::format("retain: {} duplicate texts removed ({} read, {} unique)",
                                         csv_duplicates + across, s.retain_total, s.retain_unique);
    if (it != s.notes.end())
      *it = note;
    else
      s.notes.insert(s.notes.begin(), note);
  }
  for (const auto& note : s.notes) log().info("{}", note);
  return s;
}

}  // namespace speed
