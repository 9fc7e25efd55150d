// safetensors writers: header serialisation, whole-file and streaming writes, rewrite.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "speed/error.h"
#include "speed/safetensors.h"

namespace speed {
namespace {

std::string json_string(const std::string& s, const char* what) {
  try {
    return nlohmann::json(s).dump();
  } catch (const nlohmann::json::exception&) {
    fail("{} '{}' is not valid UTF-8", what, s);
  }
}

std::uint64_t checked_span(const TensorData& t) {
  SPEED_CHECK(t.shape.size() <= kMaxRank, "tensor '{}' has rank {}, more than the limit {}", t.name,
              t.shape.size(), kMaxRank);
  std::uint64_t n = dtype_size(t.dtype);
  for (auto d : t.shape) {
    SPEED_CHECK(d >= 0, "tensor '{}' has a negative dimension in shape {}", t.name, format_shape(t.shape));
    SPEED_CHECK(!__builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n),
                "tensor '{}' shape {} overflows", t.name, format_shape(t.shape));
  }
  return n;
}

void check_names(const std::vector<TensorData>& tensors, const Metadata& metadata) {
  std::unordered_set<std::string_view> seen;
  for (const auto& t : tensors) {
    SPEED_CHECK(t.name != "__metadata__", "'__metadata__' cannot be a tensor name");
    SPEED_CHECK(seen.insert(t.name).second, "duplicate tensor name '{}'", t.name);
  }
  SPEED_CHECK(tensors.size() <= kMaxTensors, "{} tensors, more than the limit {}", tensors.size(), kMaxTensors);
  std::unordered_set<std::string_view> keys;
  for (const auto& kv : metadata) {
    SPEED_CHECK(keys.insert(kv.first).second, "duplicate metadata key '{}'", kv.first);
  }
}

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

}  // namespace

std::string make_header(const std::vector<TensorData>& tensors, const Metadata& metadata) {
  check_names(tensors, metadata);
  // Compact, {"-first, __metadata__ first, fields in the reference writer's order.
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    for (std::size_t i = 0; i < metadata.size(); ++i) {
      if (i) h += ',';
      h += json_string(metadata[i].first, "metadata key");
      h += ':';
      h += json_string(metadata[i].second, "metadata value");
    }
    h += '}';
    first = false;
  }
  std::uint64_t pos = 0;
  for (const auto& t : tensors) {
    std::uint64_t span = checked_span(t);
    if (!first) h += ',';
    first = false;
    h += json_string(t.name, "tensor name");
    h += fmt::format(R"(:{{"dtype":"{}","shape":[{}],"data_offsets":[{},{}]}})", dtype_name(t.dtype),
                     fmt::join(t.shape, ","), pos, pos + span);
    pos += span;
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  SPEED_CHECK(h.size() <= kMaxHeaderBytes, "header of {} bytes exceeds the limit of {}", h.size(), kMaxHeaderBytes);
  return h;
}

struct SafetensorsWriter::Impl {
  AtomicFile file;
  std::uint64_t expected = 0;
  std::uint64_t written = 0;
  Impl(const std::string& path, bool overwrite) : file(path, overwrite) {}
};

SafetensorsWriter::SafetensorsWriter(const std::string& path, const std::vector<TensorData>& tensors,
                                     const Metadata& metadata, bool overwrite) {
  std::string header = make_header(tensors, metadata);
  std::uint64_t total = 0;
  for (const auto& t : tensors) total += checked_span(t);
  impl_ = std::make_unique<Impl>(path, overwrite);
  impl_->expected = total;
  std::string n = le64(header.size());
  impl_->file.write(n.data(), n.size());
  impl_->file.write(header.data(), header.size());
}

SafetensorsWriter::~SafetensorsWriter() = default;

std::uint64_t SafetensorsWriter::expected_data_bytes() const { return impl_->expected; }

void SafetensorsWriter::write(const void* data, std::size_t nbytes) {
  SPEED_CHECK(nbytes <= impl_->expected - impl_->written,
              "writing {} more bytes than the header declares ({} of {} written)", nbytes,
              impl_->written, impl_->expected);
  impl_->file.write(data, nbytes);
  impl_->written += nbytes;
}

void SafetensorsWriter::commit() {
  SPEED_CHECK(impl_->written == impl_->expected, "tensor data is {} bytes, the header declares {}",
              impl_->written, impl_->expected);
  impl_->file.commit();
}

namespace {

void check_tensor_data(const std::vector<TensorData>& tensors) {
  for (const auto& t : tensors) {
    std::uint64_t span = checked_span(t);
    SPEED_CHECK(t.nbytes == span, "tensor '{}' has {} bytes of data, expected {} (shape {} x {})", t.name,
                t.nbytes, span, format_shape(t.shape), dtype_name(t.dtype));
    SPEED_CHECK(t.data != nullptr || t.nbytes == 0, "tensor '{}' has no data", t.name);
  }
}

}  // namespace

void write_safetensors(AtomicFile& file, const std::vector<TensorData>& tensors, const Metadata& metadata) {
  check_tensor_data(tensors);
  std::string header = make_header(tensors, metadata);
  std::string n = le64(header.size());
  file.write(n.data(), n.size());
  file.write(header.data(), header.size());
  for (const auto& t : tensors) file.write(t.data, t.nbytes);
}

void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const Metadata& metadata, bool overwrite) {
  check_tensor_data(tensors);
  make_header(tensors, metadata);  // a bad name fails before a temp file exists
  AtomicFile file(path, overwrite);
  write_safetensors(file, tensors, metadata);
  file.commit();
}

namespace {

// Writes `n` bytes of `source` from its mapping in 64 MiB pieces; with `release`, drops each
// piece's pages from this process once written (MADV_DONTNEED on a read-only file mapping: the
// page cache keeps them, a later read faults them in again). Copying a 2 GB checkpoint otherwise
// leaves all of it resident: peak RSS would grow by the file size. Never for a from_memory
// source: on anonymous memory MADV_DONTNEED would zero the bytes.
void write_released(AtomicFile& file, const void* data, std::size_t n, bool release) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  constexpr std::size_t kPiece = std::size_t{64} << 20;
  static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  for (std::size_t off = 0; off < n; off += kPiece) {
    const std::size_t len = std::min(kPiece, n - off);
    file.write(p + off, len);
    if (!release) continue;
    // Whole pages inside this piece only: neighbours may still be needed.
    const auto b = (reinterpret_cast<std::uintptr_t>(p + off) + page - 1) / page * page;
    const auto e = reinterpret_cast<std::uintptr_t>(p + off + len) / page * page;
    if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
  }
}

// How the source's bytes can be read: `file_mapped` when /proc/self/maps shows them in a file
// mapping (not from_memory), and `fd` (or -1) a descriptor of that very file. SafeTensors keeps
// only its mapping, so the path is opened again; it is used only when the mapping is backed by
// the same device and inode, from offset 0, and the sizes agree: a file renamed over the input
// since it was opened would give other bytes (the copy then reads the mapping).
struct SourceAccess {
  int fd = -1;
  bool file_mapped = false;
  SourceAccess() = default;
  SourceAccess(const SourceAccess&) = delete;
  SourceAccess& operator=(const SourceAccess&) = delete;
  ~SourceAccess() {
    if (fd >= 0) ::close(fd);
  }
};

void probe_source(const SafeTensors& source, SourceAccess& access) {
  if (source.file_size() == 0) return;
  const auto addr = reinterpret_cast<std::uintptr_t>(source.bytes());
  unsigned long long off = 0, ino = 0;
  unsigned maj = 0, min = 0;
  {
    std::ifstream maps("/proc/self/maps");
    bool found = false;
    for (std::string line; !found && std::getline(maps, line);) {
      std::uintptr_t lo = 0, hi = 0;
      if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %*s %llx %x:%x %llu", &lo, &hi, &off, &maj,
                      &min, &ino) == 6) {
        found = addr >= lo && addr < hi;
      }
    }
    if (!found || ino == 0) return;  // memory, or no /proc: plain writes from the bytes
  }
  access.file_mapped = true;
  int fd = ::open(source.path().c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return;
  struct stat st {};
  if (off == 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
      static_cast<std::uint64_t>(st.st_size) == source.file_size() && ::makedev(maj, min) == st.st_dev &&
      ino == static_cast<unsigned long long>(st.st_ino)) {
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);  // a cold input: larger read-ahead
    access.fd = fd;
  } else {
    ::close(fd);
  }
}

// The output as a list of byte runs: either memory (header, replacements) or a stretch of the
// source file. Adjacent stretches merge, so the untouched tensors between two replaced ones go
// out as one copy.
struct Run {
  const std::uint8_t* data;
  std::uint64_t n;
  bool in_source;
  std::uint64_t source_offset;
};

class RunList {
 public:
  explicit RunList(const SafeTensors& source)
      : base_(reinterpret_cast<std::uintptr_t>(source.bytes())), size_(source.file_size()) {}
  void add(const void* data, std::uint64_t n) {
    if (n == 0) return;
    const auto* p = static_cast<const std::uint8_t*>(data);
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    const bool in_source = a >= base_ && a - base_ <= size_ && n <= size_ - (a - base_);
    const std::uint64_t off = in_source ? a - base_ : 0;
    if (!runs_.empty() && runs_.back().data + runs_.back().n == p && runs_.back().in_source == in_source) {
      runs_.back().n += n;
      return;
    }
    runs_.push_back({p, n, in_source, off});
  }
  const std::vector<Run>& runs() const { return runs_; }

 private:
  std::uintptr_t base_;
  std::uint64_t size_;
  std::vector<Run> runs_;
};

void write_runs(AtomicFile& file, const SafeTensors& source, const RunList& list) {
  SourceAccess src;
  bool any = false;
  for (const auto& r : list.runs()) any = any || r.in_source;
  if (any) probe_source(source, src);
  for (const auto& r : list.runs()) {
    if (!r.in_source) {
      file.write(r.data, r.n);
    } else if (src.fd >= 0) {
      file.copy_from(src.fd, r.source_offset, r.n);
    } else {
      write_released(file, r.data, r.n, src.file_mapped);
    }
  }
}

}  // namespace

void rewrite_safetensors(const SafeTensors& source, const std::string& path,
                         const RewriteOptions& options) {
  AtomicFile file(path, options.overwrite, source.path());
  rewrite_safetensors(source, file, options);
  file.commit();
}

void rewrite_safetensors(const SafeTensors& source, AtomicFile& file, const RewriteOptions& options) {
  const std::string& src = source.path();
  for (const auto& [name, data] : options.replace) {
    const TensorInfo* t = source.find(name);
    SPEED_CHECK(t != nullptr, "cannot replace tensor '{}': '{}' has no such tensor", name, src);
    SPEED_CHECK(data.dtype == t->dtype, "replacement for tensor '{}' has dtype {}, expected {}", name,
                dtype_name(data.dtype), dtype_name(t->dtype));
    SPEED_CHECK(data.shape == t->shape, "replacement for tensor '{}' has shape {}, expected {}", name,
                format_shape(data.shape), format_shape(t->shape));
    SPEED_CHECK(data.nbytes == t->nbytes(), "replacement for tensor '{}' has {} bytes, expected {}", name,
                data.nbytes, t->nbytes());
    SPEED_CHECK(data.data != nullptr || data.nbytes == 0, "replacement for tensor '{}' has no data", name);
  }
  std::set<std::string> drop(options.drop.begin(), options.drop.end());
  for (const auto& name : drop) {
    SPEED_CHECK(source.contains(name), "cannot drop tensor '{}': '{}' has no such tensor", name, src);
    SPEED_CHECK(!options.replace.count(name), "tensor '{}' is both replaced and dropped", name);
  }

  std::vector<TensorData> out;
  std::vector<const TensorInfo*> from;  // source tensor for each output entry (nullptr: appended)
  out.reserve(source.tensors().size() + options.append.size());
  for (const auto& t : source.tensors()) {
    if (drop.count(t.name)) continue;
    auto r = options.replace.find(t.name);
    if (r != options.replace.end()) {
      out.push_back({t.name, t.dtype, t.shape, r->second.data, r->second.nbytes});
    } else {
      out.push_back({t.name, t.dtype, t.shape, source.data(t), static_cast<std::size_t>(t.nbytes())});
    }
    from.push_back(&t);
  }
  for (const auto& a : options.append) {
    SPEED_CHECK(!source.contains(a.name) || drop.count(a.name),
                "cannot add tensor '{}': '{}' already has it", a.name, src);
    std::uint64_t span = checked_span(a);
    SPEED_CHECK(a.nbytes == span, "tensor '{}' has {} bytes of data, expected {}", a.name, a.nbytes, span);
    SPEED_CHECK(a.data != nullptr || a.nbytes == 0, "tensor '{}' has no data", a.name);
    out.push_back(a);
    from.push_back(nullptr);
  }

  Metadata md;
  for (const auto& kv : source.metadata()) {
    if (std::find(options.remove_metadata.begin(), options.remove_metadata.end(), kv.first) ==
        options.remove_metadata.end()) {
      md.push_back(kv);
    }
  }
  for (const auto& kv : options.set_metadata) {
    auto it = std::find_if(md.begin(), md.end(), [&](const auto& e) { return e.first == kv.first; });
    if (it != md.end()) {
      it->second = kv.second;
    } else {
      md.push_back(kv);
    }
  }

  const std::string_view src_header = source.header_json();
  const bool same_tensors = drop.empty() && options.append.empty();
  const bool canonical = src_header.size() % 8 == 0 && src_header.substr(0, 2) == "{\"";
  RunList runs(source);
  std::string header, n;
  if (same_tensors && md == source.metadata() && canonical) {
    // Header unchanged: reuse its bytes and keep the source's data order, so that a no-op
    // rewrite is byte-identical even where our serialiser would spell the JSON differently.
    runs.add(source.bytes(), 8 + src_header.size());
    std::vector<std::size_t> order(out.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return from[a]->begin != from[b]->begin ? from[a]->begin < from[b]->begin : from[a]->end < from[b]->end;
    });
    for (std::size_t i : order) runs.add(out[i].data, out[i].nbytes);
  } else {
    header = make_header(out, md);
    n = le64(header.size());
    runs.add(n.data(), n.size());
    runs.add(header.data(), header.size());
    for (const auto& t : out) runs.add(t.data, t.nbytes);
  }
  write_runs(file, source, runs);
}

}  // namespace speed
