// speed/concepts.h: the texts of an edit (SPEC §1.2, §1.7, §3): targets, anchors and retain texts
// from concept files, CSV columns and the command line; the paper's presets (SPEC §1.4).
//
// Source syntax (for --concepts and --retain):
//   FILE                       a concept file: UTF-8, one concept per line, '#' starts a comment
//                              line, blank lines ignored, surrounding whitespace trimmed; a line
//                              `target => anchor` gives that target its own anchor (`target =>`
//                              is the anchor "").
//   FILE.csv:COLUMN            the column's values (RFC 4180, header row, BOM, CRLF), de-duplicated
//                              in first-appearance order (the paper's CSVs repeat a concept on
//                              every prompt row; pandas' unique() does the same)
//   FILE.csv:COLUMN:KEY=VALUE  only the rows whose column KEY equals VALUE, e.g.
//                              100_celebrity.csv:concept:type=erase
// A spec naming an existing file as a whole is always that file (paths may contain ':').
// Every parser is hostile-input safe: the limits below are enforced with errors naming the file
// and line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace speed {

inline constexpr std::size_t kMaxConceptFileBytes = 64u << 20;  // per file
inline constexpr std::size_t kMaxConceptLineBytes = 16384;      // per line / CSV record
inline constexpr std::size_t kMaxConcepts = 100000;             // texts per source and in total
inline constexpr std::size_t kMaxCsvColumns = 1024;

struct SourceSpec {
  std::string path;                                   // as given (see resolve_data_path)
  std::optional<std::string> column;                  // CSV column
  std::optional<std::string> where_key, where_value;  // KEY=VALUE row filter
  std::string spec;                                   // the original text, for messages
};
// Splits FILE[:COLUMN[:KEY=VALUE]] (see above); `exists` decides whether the whole spec is a file.
SourceSpec parse_source_spec(const std::string& spec, bool (*exists)(const std::string&) = nullptr);

// One concept with its optional per-line anchor and where it came from (for messages).
struct ConceptEntry {
  std::string text;
  std::optional<std::string> anchor;
  std::string origin;  // "file 'x.txt' line 3", "--concept", "file 'a.csv' column 'concept' row 7"
};

// Concept-file text (already read). Validates UTF-8; errors name `label` and the line.
std::vector<ConceptEntry> parse_concept_text(std::string_view data, const std::string& label);

struct CsvTable {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;  // every row has header.size() fields
  std::vector<std::size_t> row_lines;          // line of each row's start (1-based)
};
// RFC 4180: fields separated by ',', quoted with '"' ("" inside quotes is a quote), CRLF or LF,
// a UTF-8 BOM skipped, header row first. A row with a different field count is an error.
CsvTable parse_csv(std::string_view data, const std::string& label);
// The de-duplicated values of `column` (rows filtered by where_key == where_value if given);
// `duplicates` (if given) receives the number of repeated values left out.
std::vector<ConceptEntry> csv_column(const CsvTable& table, const std::string& label,
                                     const std::string& column,
                                     const std::optional<std::string>& where_key = std::nullopt,
                                     const std::optional<std::string>& where_value = std::nullopt,
                                     std::size_t* duplicates = nullptr);

// Reads a source spec: a concept file or a CSV column. `data_dir` as for resolve_data_path.
std::vector<ConceptEntry> read_source(const std::string& spec,
                                      const std::optional<std::string>& data_dir = std::nullopt,
                                      std::size_t* duplicates = nullptr);

// The file a source spec reads (a concept file or a CSV), resolved as read_source() resolves it;
// empty when the spec does not parse (read_source() then reports it).
std::string source_file(const std::string& spec,
                        const std::optional<std::string>& data_dir = std::nullopt);

// Where a data file named in a preset or on the command line is: the path as given if it exists
// (or is absolute), else <data_dir>/<path> where data_dir is `data_dir`, else $SPEED_ERASE_DATA.
// Returns the path as given when nothing matches (the open then fails naming it).
std::string resolve_data_path(const std::string& path,
                              const std::optional<std::string>& data_dir = std::nullopt);

// Python-compatible text helpers (the reference filters with re.search(r'\b' + re.escape(t) +
// r'\b', text.lower())): Unicode lower-casing as str.lower() (incl. final sigma), and a literal
// whole-word search with \b defined by Unicode word characters (alphanumerics and '_').
std::string lower_text(std::string_view utf8);
bool contains_whole_word(std::string_view text_lower, std::string_view word_lower);
bool is_valid_utf8(std::string_view s, std::size_t* error_offset = nullptr);
// Throws speed::Error naming `label` (a file), the line and the byte offset of the first byte
// that is not valid UTF-8.
void check_utf8(std::string_view data, const std::string& label);

// What the command line (or a preset) says about the texts.
struct ConceptInputs {
  std::vector<std::string> concept_sources;  // --concepts FILE | FILE.csv:COLUMN[:KEY=VALUE]
  std::vector<std::string> concept_texts;    // --concept TEXT (repeatable)
  std::vector<std::string> anchors;          // --anchor TEXT: none ("" for all), 1 (all), or N
  std::vector<std::string> retain_sources;   // --retain ... (repeatable)
  std::optional<std::string> data_dir;       // --data-dir
};

struct ConceptSet {
  std::vector<std::string> targets;
  std::vector<std::string> anchors;  // one per target
  std::vector<std::string> retain;   // unique texts left after the target filter
  std::vector<std::string> dropped;  // retain texts removed by the filter (in order)
  std::size_t retain_total = 0;      // texts read from all retain sources
  std::size_t retain_unique = 0;     // after de-duplication, before the filter
  bool has_retain_source = false;    // false: R is the empty prompt (SPEC §1.2)
  std::vector<std::string> notes;    // for the report / log
};

// Collects, validates and filters (SPEC §1.2, §1.7). Errors (speed::Error, usage errors exit 2):
// no target, a target repeated (case-insensitively: the tokenizer lower-cases), an anchor count
// that is neither 0, 1 nor N, a per-line anchor together with N anchors, an empty target,
// a retain source without texts, a retain list emptied by the filter, limits exceeded.
ConceptSet load_concepts(const ConceptInputs& inputs);
// The files every concept and retain source of `inputs` reads (for the output checks).
std::vector<std::string> source_files(const ConceptInputs& inputs);
// The same from entries already read (tests, presets): no I/O.
ConceptSet build_concept_set(const std::vector<ConceptEntry>& targets,
                             const std::vector<std::string>& anchors,
                             const std::vector<std::vector<ConceptEntry>>& retain_sources);

// A preset (SPEC §1.4, §3): JSON object whose keys are the long option names. Every field is
// optional; the CLI applies a preset first and lets flags given on the command line win.
struct Preset {
  std::string name;    // "instance" or the file path
  std::string source;  // "built-in" or the file path
  std::optional<std::string> description;
  std::vector<std::string> concept_sources;        // "concepts": string or array (sources)
  std::vector<std::string> concept_texts;          // "concept": string or array (texts)
  std::optional<std::vector<std::string>> anchor;  // "anchor": string or array
  std::vector<std::string> retain;                 // "retain": string or array (sources)
  std::optional<std::string> method, params;
  std::optional<std::int64_t> augment, iec_clusters, seed;
  std::optional<double> threshold, retain_scale, lambda, lamb, erase_scale, preserve_scale;
  std::optional<bool> no_filter, no_iec, all_tokens, allow_empty_null_space;
};

// Built-in preset names: instance, style, celebrity, nudity (the configs/*.json files).
std::vector<std::string> preset_names();
// The JSON text of a built-in preset (identical to configs/<name>.json); nullopt if unknown.
std::optional<std::string> builtin_preset_json(std::string_view name);
// Parses preset JSON. Unknown key -> error naming it; wrong type -> error naming key and type.
Preset parse_preset(std::string_view json_text, const std::string& label);
// --preset NAME|FILE: an existing file (or a name ending in .json) is read; otherwise a built-in.
Preset load_preset(const std::string& name_or_file);

}  // namespace speed
