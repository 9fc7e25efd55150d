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

// A list of prompts to embed: last-subject rows ([N, d]) or all tokens ([N, 77, d]).
struct PromptList {
  const std::vector<std::string>* prompts = nullptr;
  bool all_tokens = false;
};
// The rows of each list. The lists are embedded together, in calls of at most 4,096 prompts
// (each one pass over the encoder weights, whatever the lists and modes in it) that report
// progress (`done` of `total` prompts).
std::vector<at::Tensor> embed_lists(Embedder& emb, const std::vector<PromptList>& lists,
                                    const std::string& stage, const ProgressFn& progress,
                                    std::int64_t& done, std::int64_t total);

}  // namespace speed::detail
