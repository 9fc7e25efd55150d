// Internal pieces shared by src/app*.cc.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "speed/app.h"

namespace speed {
class Embedder;
}

namespace speed::detail {

class Stopwatch {
 public:
  Stopwatch();
  double seconds() const;

 private:
  std::chrono::steady_clock::time_point start_;
};

// Temp file + fsync + rename.
void write_text_atomic(const std::string& path, const std::string& text);
// A --report PATH must be a writable file path that is neither the model nor the output.
void check_report_path(const std::string& path, const std::vector<std::string>& taken);

// Rows of `prompts` ([N, d] last-subject or [N, 77, d] all-tokens), in chunks that report
// progress (`done` of `total` prompts).
at::Tensor embed_rows(Embedder& emb, const std::vector<std::string>& prompts, bool all_tokens,
                      const std::string& stage, const ProgressFn& progress, std::int64_t& done,
                      std::int64_t total);

}  // namespace speed::detail
