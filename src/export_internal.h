// Internal pieces shared by src/export*.cc.
#pragma once

#include <filesystem>
#include <string>

#include "speed/export.h"

namespace speed::detail {

// format=pt, extra metadata, then the report (in that order, so the big value comes last).
Metadata output_metadata(const ExportOptions& options);
void check_edits(const Checkpoint& ckpt, const EditedWeights& edited);
const KVLayer* find_layer(const Checkpoint& ckpt, const std::string& canonical);

// A temporary sibling of `target` (file or folder), removed on destruction unless committed by
// renaming it to the target.
class TempPath {
 public:
  TempPath(const std::filesystem::path& target, bool directory);
  ~TempPath();
  TempPath(const TempPath&) = delete;
  TempPath& operator=(const TempPath&) = delete;
  const std::filesystem::path& path() const { return path_; }
  void commit(const std::filesystem::path& target, bool overwrite);

 private:
  std::filesystem::path path_;
};

// edited / pt: the edited tensors under diffusers names.
void export_dict(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                 const std::filesystem::path& out, ExportResult& result);
// lora: kohya factors of ΔW.
void export_lora(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                 const std::filesystem::path& out, ExportResult& result);

}  // namespace speed::detail
