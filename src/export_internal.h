// Internal pieces shared by src/export*.cc.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "speed/atomic_file.h"
#include "speed/export.h"

namespace speed::detail {

// format=pt, extra metadata, then the report (in that order, so the big value comes last).
Metadata output_metadata(const ExportOptions& options);
void check_edits(const Checkpoint& ckpt, const EditedWeights& edited);
const KVLayer* find_layer(const Checkpoint& ckpt, const std::string& canonical);

// What a run writes, staged: every file written and fsynced under a temp name, nothing renamed
// into place until publish(), the last step of a run. Destroyed unpublished, it removes them all.
struct Staging {
  std::vector<std::unique_ptr<AtomicFile>> sidecars;  // published first (.report.json, .yaml)
  std::unique_ptr<AtomicDir> dir;                      // diffusers full: the output folder
  std::vector<std::unique_ptr<AtomicFile>> outputs;    // published last
  AtomicFile& sidecar(const std::string& path, bool overwrite);
  AtomicFile& output(const std::string& path, bool overwrite, const std::string& avoid = {});
  void publish();
};

// edited / pt: the edited tensors under diffusers names.
void export_dict(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                 const std::filesystem::path& out, ExportResult& result, Staging& staging);
// lora: kohya factors of ΔW.
void export_lora(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                 const std::filesystem::path& out, ExportResult& result, Staging& staging);

}  // namespace speed::detail
