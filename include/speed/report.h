// speed/report.h: the run report (SPEC §4) as ordered JSON (stable key order), built by the app
// module. The copy embedded in outputs leaves out what changes from run to run (timings, cache
// statistics, the output section), so that the same inputs and seed give byte-identical outputs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "speed/checkpoint.h"
#include "speed/concepts.h"
#include "speed/erase.h"

namespace speed {

// Fast, documented fingerprint of a checkpoint: XXH64 over, for each file in order, its size and
// its header bytes (all names, dtypes, shapes, offsets and metadata), then the stored bytes of
// every K/V tensor (what the edit reads). Reading ~tens of MB, not the whole file.
struct InputFingerprint {
  std::uint64_t total_bytes = 0;  // sum of the files' sizes
  std::string xxh64;              // 16 hex digits
};
InputFingerprint fingerprint_checkpoint(const Checkpoint& ckpt);

// {"path", "size", "files", "hash": {...}, "family", "layout", "context_dim", "kv_dtype", ...}
nlohmann::ordered_json input_json(const Checkpoint& ckpt, const InputFingerprint& fp);

// The effective edit options (long option names as keys).
nlohmann::ordered_json options_json(const EraseOptions& options);

// Targets, anchors and retain counts after filtering.
nlohmann::ordered_json concepts_json(const ConceptSet& set, const std::vector<std::string>& retain_sources);

// One entry per edited layer: name, source key, shape, rows (IPF/DPA), null_dim, eigenvalues,
// norms and residuals. NaN values are written as null.
nlohmann::ordered_json layer_json(const LayerDiagnostics& d, const std::string& source);

// A double for JSON: NaN/Inf -> null.
nlohmann::ordered_json number_or_null(double v);

// An environment variable as this process sees it: its value, or null when it is unset.
nlohmann::ordered_json env_or_null(const char* name);
// The variable's value as a number; null when unset, empty or not a finite number.
nlohmann::ordered_json number_env_or_null(const char* name);

// The keys of a full report that are left out of the copy embedded in the outputs.
const std::vector<std::string>& volatile_report_keys();
// The report without volatile keys, compact (one line), for __metadata__.
std::string embedded_report(const nlohmann::ordered_json& full);

}  // namespace speed
