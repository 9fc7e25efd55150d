// speed/export.h: writing the edit (SPEC §2 "Outputs", reference/formats.md §1.4, §5, §6, §7).
//
// Four formats:
//   full    the input's container and layout; untouched tensors and metadata byte for byte,
//           edited K/V tensors cast to their stored dtype (round-to-nearest-even), EMA twins
//           edited with the same W' or dropped; diffusers folders are copied with only the UNet
//           safetensors file(s) rewritten.
//   edited  only the edited tensors, diffusers UNet names, stored dtype of each source tensor.
//   pt      the same dictionary as a PyTorch pickle (torch::pickle_save), for torch.load.
//   lora    kohya LoRA of the exact ΔW (float64 SVD, numerical rank, alpha = rank, no clamping).
// Every output carries the run's report JSON in __metadata__["speed_erase.report"] and
// "format": "pt". Every file is written to a temporary sibling and renamed: a failed export
// leaves nothing behind, never touches the input, and leaves an existing output (--force) as it
// was until the rename.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/ATen.h>

#include "speed/checkpoint.h"
#include "speed/safetensors.h"

namespace speed {

enum class OutputFormat { Full, Edited, Pt, Lora };

const char* format_name(OutputFormat f);  // "full", "edited", "pt", "lora"
// Throws speed::UsageError for anything else.
OutputFormat parse_format(std::string_view name);

// Metadata key that holds the report JSON in every output.
inline constexpr const char* kReportMetadataKey = "speed_erase.report";

// Canonical (diffusers) layer name -> edited weight W' [out, in], any floating dtype (float64
// for an exact LoRA; the stored dtype makes the cast a no-op), CPU or CUDA. Layers of ckpt.kv
// that are absent are left unchanged.
using EditedWeights = std::map<std::string, at::Tensor>;

struct ExportOptions {
  OutputFormat format = OutputFormat::Full;
  std::string output;          // empty: default_output_path()
  bool force = false;          // replace an existing output
  bool drop_ema = false;       // full: leave EMA twins out instead of editing them
  std::string report_json;     // embedded under kReportMetadataKey (empty: not embedded)
  Metadata extra_metadata;     // further string metadata (e.g. "speed_erase.version")
  // lora: singular values <= rank_rtol * s_max are dropped. <= 0 picks the precision-aware
  // default max(out, in) * eps(dtype of W') (numpy.linalg.matrix_rank's rule).
  double lora_rank_rtol = 0.0;
  // The run's other input files (concept and retain lists, the preset, the merges file): the
  // output may not be one of them, nor a folder holding one, as it may not be the model.
  std::vector<std::string> inputs;
};

struct LoraLayerInfo {
  std::string module;       // kohya module name, e.g. lora_unet_down_blocks_0_..._attn2_to_k
  std::int64_t rank = 0;    // 0: ΔW vanished, module not written
  double rel_error = 0.0;   // ‖ΔW - up·down‖_F / ‖ΔW‖_F of the float32 factors (0 for rank 0)
};

struct ExportResult {
  std::string path;                  // the output file or folder
  std::vector<std::string> written;  // files written (not copied)
  std::vector<std::string> copied;   // files copied unchanged (diffusers full)
  std::vector<std::string> skipped;  // diffusers full: other UNet variants left out (relative)
  std::uint64_t bytes = 0;           // bytes written + copied
  int ema_edited = 0;
  int ema_dropped = 0;
  std::vector<LoraLayerInfo> lora;   // lora only, in ckpt.kv order
};

// `<input stem>.speed-erase.<suffix>` next to the input: full -> same extension (or a folder
// for a diffusers input), edited -> .speed-erase.edited.safetensors, pt -> .speed-erase.pt,
// lora -> .speed-erase.lora.safetensors.
std::string default_output_path(const Checkpoint& ckpt, OutputFormat format);

// Validates the output before any work: not the input (nor inside a diffusers input), not
// existing unless `force`, parent directory existing and writable, a folder for diffusers full.
// Returns the path to use. Throws speed::Error / UsageError with a hint.
std::string prepare_output(const Checkpoint& ckpt, const ExportOptions& options);

namespace detail {
struct Staging;
}

// An output written in full but not yet in place: every file (or the diffusers folder) is on
// disk under a temp name beside its target. commit() renames them into place (sidecars first,
// the output itself last) and is meant as the last step of a run, after the report is written;
// destroyed uncommitted, it removes them, and any previous output stays byte-identical.
class StagedExport {
 public:
  StagedExport(StagedExport&&) noexcept;
  StagedExport& operator=(StagedExport&&) noexcept;
  ~StagedExport();
  const ExportResult& result() const { return result_; }
  void commit();

 private:
  friend StagedExport stage_export(const Checkpoint&, const EditedWeights&, const ExportOptions&);
  StagedExport();
  ExportResult result_;
  std::unique_ptr<detail::Staging> staging_;
};

// Writes the output, staged. `edited` must name layers of ckpt.kv with their shapes.
StagedExport stage_export(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options);
// stage_export(...) committed at once.
ExportResult export_edit(const Checkpoint& ckpt, const EditedWeights& edited,
                         const ExportOptions& options);

// ---- pieces, exposed for tests ----

// kohya module name of a K/V layer: SD1/SD2 `lora_unet_` + diffusers path, SDXL `lora_unet_` +
// LDM path (formats.md §6.1, §6.4); `.weight` removed, dots -> underscores.
std::string lora_module_name(Family family, const std::string& canonical);

// ΔW [out, in] -> (up [out, r], down [r, in]) in float64 with ΔW ≈ up·down; r per the rule above
// (`rtol` <= 0: max(out, in) * eps(precision)). r may be 0 (empty tensors).
struct LoraFactors {
  at::Tensor up, down;
  std::int64_t rank = 0;
};
LoraFactors lora_factors(const at::Tensor& delta, double rtol, at::ScalarType precision);

// Metadata keys of the input that become stale when tensor bytes change (formats.md §7.4).
bool is_stale_hash_key(std::string_view key);

// The bytes of `w` as stored dtype `dtype` (round-to-nearest-even for F16/BF16), contiguous CPU.
at::Tensor to_stored_dtype(const at::Tensor& w, Dtype dtype);

}  // namespace speed
