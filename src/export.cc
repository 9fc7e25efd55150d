// export: output paths, format dispatch and the `full` format (single file and diffusers folder).
#include "speed/export.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>
#include <system_error>

#include "export_internal.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/tensor.h"

namespace fs = std::filesystem;

namespace speed {

const char* format_name(OutputFormat f) {
  switch (f) {
    case OutputFormat::Full: return "full";
    case OutputFormat::Edited: return "edited";
    case OutputFormat::Pt: return "pt";
    case OutputFormat::Lora: return "lora";
  }
  return "?";
}

OutputFormat parse_format(std::string_view name) {
  for (auto f : {OutputFormat::Full, OutputFormat::Edited, OutputFormat::Pt, OutputFormat::Lora}) {
    if (name == format_name(f)) return f;
  }
  throw UsageError(fmt::format("unknown output format '{}'", name),
                   "use --format full, edited, pt or lora");
}

bool is_stale_hash_key(std::string_view key) {
  if (key == "sshs_model_hash" || key == "sshs_legacy_hash") return true;
  // modelspec.hash_sha256 and friends describe the old bytes.
  return key.rfind("modelspec.", 0) == 0 && key.find("hash") != std::string_view::npos;
}

namespace {

bool full_is_folder(const Checkpoint& ckpt, OutputFormat format) {
  return format == OutputFormat::Full && ckpt.layout == Layout::Diffusers;
}

std::string format_suffix(OutputFormat format) {
  switch (format) {
    case OutputFormat::Full: return ".speed-erase.safetensors";
    case OutputFormat::Edited: return ".speed-erase.edited.safetensors";
    case OutputFormat::Pt: return ".speed-erase.pt";
    case OutputFormat::Lora: return ".speed-erase.lora.safetensors";
  }
  return {};
}

// Same file or folder, also through symlinks and different spellings.
bool same_entity(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  if (fs::exists(a, ec) && fs::exists(b, ec)) return fs::equivalent(a, b, ec);
  return fs::weakly_canonical(a, ec) == fs::weakly_canonical(b, ec);
}

bool is_inside(const fs::path& child, const fs::path& folder) {
  std::error_code ec;
  auto c = fs::weakly_canonical(child, ec);
  auto f = fs::weakly_canonical(folder, ec);
  auto [fi, ci] = std::mismatch(f.begin(), f.end(), c.begin(), c.end());
  return fi == f.end();
}

}  // namespace

std::string default_output_path(const Checkpoint& ckpt, OutputFormat format) {
  fs::path in = fs::path(ckpt.path).lexically_normal();
  if (in.has_filename() == false) in = in.parent_path();  // "folder/" -> "folder"
  if (full_is_folder(ckpt, format)) {
    return (in.parent_path() / (in.filename().string() + ".speed-erase")).string();
  }
  std::string stem = ckpt.layout == Layout::Diffusers ? in.filename().string() : in.stem().string();
  std::string suffix = format_suffix(format);
  if (format == OutputFormat::Full) {
    // Keep the input's extension (.safetensors today, .ckpt inputs are rewritten as safetensors).
    suffix = ".speed-erase.safetensors";
  }
  return (in.parent_path() / (stem + suffix)).string();
}

std::string prepare_output(const Checkpoint& ckpt, const ExportOptions& options) {
  std::string out = options.output.empty() ? default_output_path(ckpt, options.format)
                                           : options.output;
  fs::path p = fs::path(out).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  std::error_code ec;
  SPEED_CHECK(!p.empty(), "output path '{}' is empty", out);
  if (same_entity(p, ckpt.path)) {
    throw UsageError(fmt::format("output '{}' is the input model", out),
                     "speed-erase never modifies its input; choose another --output");
  }
  for (const auto& f : ckpt.files) {
    if (same_entity(p, f.path)) {
      throw UsageError(fmt::format("output '{}' is the input file '{}'", out, f.path),
                       "speed-erase never modifies its input; choose another --output");
    }
  }
  if (ckpt.layout == Layout::Diffusers && is_inside(p, ckpt.path)) {
    throw UsageError(fmt::format("output '{}' is inside the input model folder '{}'", out, ckpt.path),
                     "write the output next to the model folder, not into it");
  }
  for (const auto& f : options.inputs) {
    if (f.empty() || !fs::is_regular_file(f, ec)) continue;
    if (same_entity(p, f)) {
      throw UsageError(fmt::format("output '{}' is the input file '{}'", out, f),
                       "speed-erase never modifies its input; choose another --output");
    }
  }
  // With --force an existing folder is replaced whole: never one that holds an input.
  std::vector<std::string> held = options.inputs;
  held.push_back(ckpt.path);
  for (const auto& f : held) {
    if (!f.empty() && fs::exists(f, ec) && is_inside(f, p)) {
      throw UsageError(fmt::format("output '{}' contains the input '{}'", out, f),
                       "speed-erase never modifies its input; choose another --output");
    }
  }
  if (fs::exists(fs::symlink_status(p, ec))) {
    if (!options.force) {
      fail_hint("pass --force to replace it, or choose another --output",
                "output '{}' already exists", out);
    }
    bool is_dir = fs::is_directory(p, ec);
    if (full_is_folder(ckpt, options.format) && !is_dir) {
      fail("output '{}' exists and is not a folder; a diffusers model is written as a folder", out);
    }
    if (!full_is_folder(ckpt, options.format) && is_dir) {
      fail("output '{}' is a folder, expected a file for --format {}", out,
           format_name(options.format));
    }
  }
  fs::path parent = p.parent_path();
  if (parent.empty()) parent = ".";
  if (!fs::is_directory(parent, ec)) {
    fail_hint("create it first, or choose another --output",
              "output folder '{}' does not exist", parent.string());
  }
  if (::access(parent.c_str(), W_OK | X_OK) != 0) {
    fail_hint("choose an --output in a folder you can write",
              "output folder '{}' is not writable: {}", parent.string(), std::strerror(errno));
  }
  return p.string();
}

namespace detail {

Metadata output_metadata(const ExportOptions& options) {
  Metadata md;
  md.emplace_back("format", "pt");
  for (const auto& kv : options.extra_metadata) md.push_back(kv);
  if (!options.report_json.empty()) md.emplace_back(kReportMetadataKey, options.report_json);
  return md;
}

void check_edits(const Checkpoint& ckpt, const EditedWeights& edited) {
  for (const auto& [name, w] : edited) {
    const KVLayer* layer = find_layer(ckpt, name);
    SPEED_CHECK(layer != nullptr, "edited layer '{}' is not a cross-attention K/V layer of '{}'",
                name, ckpt.path);
    SPEED_CHECK(w.defined() && w.dim() == 2 && w.size(0) == layer->out && w.size(1) == layer->in,
                "edited layer '{}' has shape {}, expected [{}, {}]", name,
                w.defined() ? shape_string(w.sizes()) : std::string("undefined"), layer->out, layer->in);
    auto st = w.scalar_type();
    SPEED_CHECK(at::isFloatingType(st), "edited layer '{}' must be a floating-point tensor", name);
  }
}

const KVLayer* find_layer(const Checkpoint& ckpt, const std::string& canonical) {
  for (const auto& l : ckpt.kv) {
    if (l.canonical == canonical) return &l;
  }
  return nullptr;
}

AtomicFile& Staging::sidecar(const std::string& path, bool overwrite) {
  sidecars.push_back(std::make_unique<AtomicFile>(path, overwrite));
  return *sidecars.back();
}

AtomicFile& Staging::output(const std::string& path, bool overwrite, const std::string& avoid) {
  outputs.push_back(std::make_unique<AtomicFile>(path, overwrite, avoid));
  return *outputs.back();
}

void Staging::publish() {
  for (auto& f : sidecars) f->publish();
  if (dir) dir->publish();
  for (auto& f : outputs) f->publish();
}

}  // namespace detail

namespace {

using detail::Staging;

// Replacement bytes for one file of the checkpoint, with the tensors that keep them alive.
struct FileEdit {
  RewriteOptions options;
  std::vector<at::Tensor> keep;
};

std::map<std::size_t, FileEdit> plan_full(const Checkpoint& ckpt, const EditedWeights& edited,
                                          const ExportOptions& options, ExportResult& result) {
  std::map<std::size_t, FileEdit> plan;
  auto add = [&](std::size_t file, const std::string& name, const at::Tensor& w) {
    const TensorInfo& info = ckpt.file(file).at(name);
    at::Tensor bytes = to_stored_dtype(w, info.dtype);
    FileEdit& fe = plan[file];
    fe.keep.push_back(bytes);
    fe.options.replace[name] = TensorData{name, info.dtype, info.shape, bytes.data_ptr(),
                                          static_cast<std::size_t>(bytes.nbytes())};
  };
  for (const KVLayer& layer : ckpt.kv) {
    auto it = edited.find(layer.canonical);
    if (it == edited.end()) continue;
    add(layer.file, layer.source, it->second);
    if (layer.ema_twin && !options.drop_ema) {
      add(layer.file, *layer.ema_twin, it->second);
      ++result.ema_edited;
    }
  }
  if (options.drop_ema) {
    // Dropping only the edited twins would leave an EMA set that converters reject: drop all.
    for (std::size_t i = 0; i < ckpt.files.size(); ++i) {
      for (const auto& t : ckpt.file(i).tensors()) {
        if (t.name.rfind("model_ema.", 0) == 0) {
          plan[i].options.drop.push_back(t.name);
          ++result.ema_dropped;
        }
      }
    }
  }
  Metadata md = detail::output_metadata(options);
  for (auto& [file, fe] : plan) {
    for (const auto& [k, v] : ckpt.file(file).metadata()) {
      if (is_stale_hash_key(k)) fe.options.remove_metadata.push_back(k);
    }
    fe.options.set_metadata = md;
  }
  return plan;
}

void log_ema(const ExportResult& r) {
  if (r.ema_edited > 0) {
    log().warn("edited {} EMA twin(s) (model_ema.*) with the same weights; --drop-ema leaves "
               "the EMA copy out instead", r.ema_edited);
  }
  if (r.ema_dropped > 0) {
    log().warn("dropped {} EMA tensor(s) (model_ema.*): the output is a pruned checkpoint",
               r.ema_dropped);
  }
}

// Copies the regular file `from` into the staged `to` (inside the kernel where possible) and
// fsyncs it.
void copy_into(const fs::path& from, AtomicFile& to) {
  int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int err = errno;
    fail("cannot open '{}' to copy it: {}", from.string(), std::strerror(err));
  }
  struct stat st {};
  try {
    SPEED_CHECK(::fstat(fd, &st) == 0 && S_ISREG(st.st_mode), "cannot copy '{}': not a regular file",
                from.string());
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    to.copy_from(fd, 0, static_cast<std::uint64_t>(st.st_size));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  to.finish();
}

void export_full_file(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                      const fs::path& out, ExportResult& result, Staging& staging) {
  SPEED_CHECK(ckpt.files.size() == 1, "a '{}' checkpoint has {} files, expected 1",
              layout_name(ckpt.layout), ckpt.files.size());
  auto plan = plan_full(ckpt, edited, options, result);
  FileEdit& fe = plan[0];
  if (fe.options.set_metadata.empty()) fe.options.set_metadata = detail::output_metadata(options);
  fe.options.overwrite = options.force;
  // A1111 picks the model config from a same-named .yaml next to the file (formats.md §7.5).
  fs::path yaml = fs::path(ckpt.path).replace_extension(".yaml");
  std::error_code ec;
  if (fs::is_regular_file(yaml, ec)) {
    fs::path out_yaml = fs::path(out).replace_extension(".yaml");
    if (!fs::exists(out_yaml, ec) || options.force) {
      copy_into(yaml, staging.sidecar(out_yaml.string(), /*overwrite=*/true));
      result.copied.push_back(out_yaml.string());
    }
  }
  AtomicFile& file = staging.output(out.string(), options.force, ckpt.file(0).path());
  rewrite_safetensors(ckpt.file(0), file, fe.options);
  file.finish();
  result.written.push_back(out.string());
  result.bytes += file.size();
}

void export_full_folder(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options,
                        const fs::path& out, ExportResult& result, Staging& staging) {
  auto plan = plan_full(ckpt, edited, options, result);
  fs::path root = fs::path(ckpt.path).lexically_normal();
  if (!root.has_filename()) root = root.parent_path();
  std::map<fs::path, std::size_t> rewrite;  // relative path -> file index
  for (auto& [file, fe] : plan) {
    fs::path rel = fs::path(ckpt.files[file].path).lexically_normal().lexically_relative(root);
    SPEED_CHECK(!rel.empty() && *rel.begin() != "..", "model file '{}' is outside the folder '{}'",
                ckpt.files[file].path, ckpt.path);
    rewrite[rel] = file;
  }
  // UNet weight files of the folder that this checkpoint does not use (another variant, a .bin
  // copy): copied unedited they would hand the erased concept back to whoever loads them.
  std::set<fs::path> unet_used;
  for (const auto& f : ckpt.files) {
    if (f.role == "unet") unet_used.insert(fs::path(f.path).lexically_normal().lexically_relative(root));
  }
  if (ckpt.unet_index) unet_used.insert(fs::path(*ckpt.unet_index).lexically_normal().lexically_relative(root));
  auto stale_unet_file = [&](const fs::path& rel) {
    if (rel.begin() == rel.end() || *rel.begin() != "unet") return false;
    std::string name = rel.filename().string();
    return name.rfind("diffusion_pytorch_model", 0) == 0 && unet_used.count(rel) == 0;
  };
  staging.dir = std::make_unique<AtomicDir>(out.string(), options.force);
  const fs::path tmp = staging.dir->temp_path();
  // Copies, not hard links: a hard-linked output would change whenever anything rewrote the
  // input's files in place (and the reverse), defeating "the input is never touched". Each file
  // is fsynced inside the hidden folder before the folder takes the output's name.
  std::error_code ec;
  // Links are followed (a Hugging Face cache snapshot is a folder of links into blobs/), but a
  // link to a folder that contains it (`self -> .`, `up -> ..`) would be copied into itself until
  // the path grew too long: refused, as is nesting no model has.
  constexpr int kMaxFolderDepth = 16;
  for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::follow_directory_symlink);
       it != fs::recursive_directory_iterator(); ++it) {
    fs::path rel = it->path().lexically_relative(root);
    fs::path dst = tmp / rel;
    if (it->is_directory()) {
      SPEED_CHECK(it.depth() < kMaxFolderDepth, "'{}' is nested {} folders deep in '{}', expected at most {}",
                  rel.string(), it.depth() + 1, root.string(), kMaxFolderDepth);
      if (it->is_symlink()) {
        const fs::path target = fs::canonical(it->path(), ec);
        SPEED_CHECK(!ec && !is_inside(it->path().parent_path(), target),
                    "'{}' in the model folder is a link to '{}', which contains it (a link loop)",
                    rel.string(), ec ? std::string("?") : target.string());
      }
      fs::create_directories(dst, ec);
      SPEED_CHECK(!ec, "cannot create folder '{}': {}", dst.string(), ec.message());
      continue;
    }
    if (!it->is_regular_file()) continue;  // sockets, dangling links: nothing a loader reads
    if (stale_unet_file(rel)) {
      log().warn("left out '{}': a UNet weight file this run did not read or edit", rel.string());
      result.skipped.push_back(rel.string());
      continue;
    }
    AtomicFile file(dst.string(), /*overwrite=*/false);
    auto rw = rewrite.find(rel);
    if (rw != rewrite.end()) {
      FileEdit& fe = plan[rw->second];
      rewrite_safetensors(ckpt.file(rw->second), file, fe.options);
      file.finish();
      result.written.push_back((out / rel).string());
    } else {
      copy_into(it->path(), file);
      result.copied.push_back((out / rel).string());
    }
    result.bytes += file.size();
    file.publish();  // inside the hidden folder: no output changes yet
  }
  SPEED_CHECK(result.written.size() == rewrite.size(), "not every edited file of '{}' was written",
              ckpt.path);
}

}  // namespace

StagedExport::StagedExport() : staging_(std::make_unique<Staging>()) {}
StagedExport::StagedExport(StagedExport&&) noexcept = default;
StagedExport& StagedExport::operator=(StagedExport&&) noexcept = default;
StagedExport::~StagedExport() = default;

void StagedExport::commit() {
  SPEED_CHECK(staging_ != nullptr, "output '{}' committed twice", result_.path);
  staging_->publish();
  staging_.reset();
}

StagedExport stage_export(const Checkpoint& ckpt, const EditedWeights& edited, const ExportOptions& options) {
  detail::check_edits(ckpt, edited);
  std::string out = prepare_output(ckpt, options);
  StagedExport staged;
  ExportResult& result = staged.result_;
  Staging& staging = *staged.staging_;
  result.path = out;
  switch (options.format) {
    case OutputFormat::Full:
      if (ckpt.layout == Layout::Diffusers) {
        export_full_folder(ckpt, edited, options, out, result, staging);
      } else {
        export_full_file(ckpt, edited, options, out, result, staging);
      }
      log_ema(result);
      break;
    case OutputFormat::Edited:
    case OutputFormat::Pt:
      detail::export_dict(ckpt, edited, options, out, result, staging);
      break;
    case OutputFormat::Lora:
      detail::export_lora(ckpt, edited, options, out, result, staging);
      break;
  }
  return staged;
}

ExportResult export_edit(const Checkpoint& ckpt, const EditedWeights& edited,
                         const ExportOptions& options) {
  StagedExport staged = stage_export(ckpt, edited, options);
  staged.commit();
  return staged.result();
}

}  // namespace speed
