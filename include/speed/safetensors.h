// speed/safetensors.h: safetensors reading (mmap or memory, zero-copy) and writing.
//
// Reader rules follow the Hugging Face reference reader (reference/formats.md §1.3): header
// length limits, JSON shape, string-only __metadata__, known dtypes, offsets contiguous from 0 and
// ending at EOF, span = numel x itemsize, no overflow, no duplicate names. Writer rules follow
// §1.4: compact header beginning with {" and padded with spaces to a multiple of 8, temp file in
// the target directory + fsync + rename (speed/atomic_file.h); a failed or interrupted write
// leaves no output.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "speed/atomic_file.h"  // AtomicFile; install_cleanup_signal_handlers()

namespace speed {

enum class Dtype {
  BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64,
};

// "F16" -> Dtype::F16; nullopt for unknown strings.
std::optional<Dtype> dtype_from_string(std::string_view s);
const char* dtype_name(Dtype d);
std::size_t dtype_size(Dtype d);  // bytes per element

// "[320, 768]" (the message grammar's shape spelling).
std::string format_shape(const std::vector<std::int64_t>& shape);

// Limits that guard allocation on hostile input (named in error messages).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // as the reference reader
inline constexpr std::size_t kMaxTensors = 1'000'000;
inline constexpr std::size_t kMaxRank = 16;

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // byte offsets relative to the data buffer, [begin, end)
  std::uint64_t end = 0;
  std::int64_t numel() const;
  std::uint64_t nbytes() const { return end - begin; }
};

// A parsed safetensors file. Owns its bytes (a read-only mmap or an in-memory copy).
class SafeTensors {
 public:
  // Memory-maps `path` and validates the header. Throws speed::Error naming the file.
  static SafeTensors open(const std::string& path);
  // Parses bytes already in memory (moved in, not copied again); `label` names the source in errors.
  static SafeTensors from_memory(std::string bytes, std::string label = "<memory>");

  SafeTensors(SafeTensors&&) noexcept;
  SafeTensors& operator=(SafeTensors&&) noexcept;
  ~SafeTensors();

  const std::string& path() const;  // or the label
  std::uint64_t file_size() const;
  std::uint64_t header_size() const;  // N (the padded JSON length)
  std::uint64_t data_start() const { return 8 + header_size(); }
  std::string_view header_json() const;  // the N header bytes, padding included

  // Tensors in header (JSON) order, which is the order the writer keeps.
  const std::vector<TensorInfo>& tensors() const;
  const TensorInfo* find(std::string_view name) const;  // nullptr if absent
  const TensorInfo& at(std::string_view name) const;    // throws naming the tensor
  bool contains(std::string_view name) const { return find(name) != nullptr; }

  // Metadata in header order (the __metadata__ object); empty if absent.
  const std::vector<std::pair<std::string, std::string>>& metadata() const;
  const std::string* metadata_value(std::string_view key) const;  // nullptr if absent

  // Raw bytes of a tensor (points into the mapping; valid while this object lives).
  const std::uint8_t* data(const TensorInfo& t) const;
  // Drops the whole pages inside the tensor's bytes from this process (MADV_DONTNEED on the
  // read-only file mapping: the page cache keeps them, a later read faults them in again, the
  // bytes never change). For data already copied elsewhere (a converted text encoder). No-op
  // for from_memory bytes, which MADV_DONTNEED would zero.
  void release_pages(const TensorInfo& t) const;
  // The whole file's bytes.
  const std::uint8_t* bytes() const;

 private:
  struct Impl;
  explicit SafeTensors(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A tensor to write: name, dtype, shape and its bytes (not owned; must outlive the write call).
// For SafetensorsWriter only name/dtype/shape are used (data may stay null).
struct TensorData {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
  std::size_t nbytes = 0;
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

// Writes a new file with `tensors` in the given order and `metadata` (first in the header).
// Atomic: writes `<dir>/.<name>.tmp-XXXXXX`, fsyncs, renames over `path`. Refuses to overwrite
// an existing file unless `overwrite`, and never replaces something that is not a regular file.
void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const Metadata& metadata, bool overwrite = false);

// Streaming writer for outputs too big to hold in memory (e.g. full-size synthetic checkpoints):
// the header is fixed up front, then the tensors' bytes are appended in order with write().
// commit() checks the byte count, fsyncs and renames; destroying an uncommitted writer (or any
// error) removes the temp file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, const std::vector<TensorData>& tensors,
                    const Metadata& metadata, bool overwrite = false);
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  ~SafetensorsWriter();
  void write(const void* data, std::size_t nbytes);
  void commit();
  std::uint64_t expected_data_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Rewrites `source` to `path`: every tensor in the source order; tensors named in `replace`
// take the given bytes (same dtype, shape and size, checked); tensors named in `drop` are left
// out; `append` tensors are added at the end; untouched tensors are copied byte for byte
// (streamed, memory does not grow with file size). Metadata: the source's keys in order, minus
// `remove_metadata`, then `set_metadata` (replacing values of existing keys in place, new keys
// appended). When neither the tensor list nor the metadata change and the source header is
// canonical (begins with {" and N is a multiple of 8), the source header bytes are reused
// verbatim, so a no-op rewrite is byte-identical. Refuses `path` naming the source file itself
// (same inode, whatever the spelling).
struct RewriteOptions {
  std::map<std::string, TensorData> replace;
  std::vector<std::string> drop;
  std::vector<TensorData> append;
  Metadata set_metadata;
  std::vector<std::string> remove_metadata;
  bool overwrite = false;
};
void rewrite_safetensors(const SafeTensors& source, const std::string& path,
                         const RewriteOptions& options);

// Serialises the header JSON for `tensors` (offsets assigned in order) and metadata, padded.
std::string make_header(const std::vector<TensorData>& tensors, const Metadata& metadata);

// The same two writes into a staged AtomicFile (speed/atomic_file.h), left unpublished: the
// caller publishes it once every output of the run is written. rewrite_safetensors checks the
// file against the source only through AtomicFile's `avoid` (pass source.path()).
void write_safetensors(AtomicFile& file, const std::vector<TensorData>& tensors, const Metadata& metadata);
void rewrite_safetensors(const SafeTensors& source, AtomicFile& file, const RewriteOptions& options);

}  // namespace speed
