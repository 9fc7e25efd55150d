// safetensors reader: mmap / memory ownership and the hostile-header validator.
#include "speed/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <unordered_map>

#include "safetensors_header.h"
#include "speed/error.h"

namespace speed {

namespace {

struct DtypeRow {
  Dtype dtype;
  const char* name;
  std::size_t size;
};
// Names and sizes as the reference's Dtype enum (reference/formats.md §1.1).
constexpr DtypeRow kDtypes[] = {
    {Dtype::BOOL, "BOOL", 1}, {Dtype::U8, "U8", 1},     {Dtype::I8, "I8", 1},
    {Dtype::F8_E5M2, "F8_E5M2", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::I16, "I16", 2},
    {Dtype::U16, "U16", 2},   {Dtype::F16, "F16", 2},   {Dtype::BF16, "BF16", 2},
    {Dtype::I32, "I32", 4},   {Dtype::U32, "U32", 4},   {Dtype::F32, "F32", 4},
    {Dtype::F64, "F64", 8},   {Dtype::I64, "I64", 8},   {Dtype::U64, "U64", 8},
};

const DtypeRow& row(Dtype d) {
  for (const auto& r : kDtypes) {
    if (r.dtype == d) return r;
  }
  fail("invalid dtype value {}", static_cast<int>(d));
}

std::uint64_t read_le64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

std::optional<Dtype> dtype_from_string(std::string_view s) {
  for (const auto& r : kDtypes) {
    if (s == r.name) return r.dtype;
  }
  return std::nullopt;
}

const char* dtype_name(Dtype d) { return row(d).name; }
std::size_t dtype_size(Dtype d) { return row(d).size; }

std::string format_shape(const std::vector<std::int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

std::int64_t TensorInfo::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;  // validated at parse time: no overflow, no negatives
  return n;
}

struct SafeTensors::Impl {
  std::string label;
  std::string owned;  // from_memory bytes
  void* map = nullptr;
  std::size_t map_len = 0;
  const std::uint8_t* base = nullptr;
  std::uint64_t size = 0;
  std::uint64_t header_n = 0;
  std::vector<TensorInfo> tensors;
  std::unordered_map<std::string, std::size_t> index;
  Metadata metadata;

  ~Impl() {
    if (map != nullptr) munmap(map, map_len);
  }
  void parse();
};

void SafeTensors::Impl::parse() {
  const std::string& f = label;
  SPEED_CHECK(size >= 8, "'{}': file is {} bytes, expected at least 8 (the header length)", f, size);
  header_n = read_le64(base);
  SPEED_CHECK(header_n <= kMaxHeaderBytes,
              "'{}': header length {} exceeds the limit of {} bytes", f, header_n, kMaxHeaderBytes);
  SPEED_CHECK(header_n <= size - 8,
              "'{}': header length {} runs past the end of the file (8 + {} > {} bytes)", f,
              header_n, header_n, size);
  SPEED_CHECK(header_n >= 2, "'{}': header length {} is too small for a JSON object", f, header_n);
  const char* text = reinterpret_cast<const char*>(base + 8);

  try {
    detail::parse_header_json(text, static_cast<std::size_t>(header_n), tensors, metadata);
  } catch (const HeaderReject& e) {
    fail("'{}': {}", f, e.message);
  }
  SPEED_CHECK(tensors.size() <= kMaxTensors, "'{}': header lists {} tensors, more than the limit {} (kMaxTensors)",
              f, tensors.size(), kMaxTensors);

  // Offsets must tile the data buffer from 0 with no gap or overlap (sorted as the reference).
  std::vector<std::size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const auto& x = tensors[a];
    const auto& y = tensors[b];
    return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
  });
  std::uint64_t pos = 0;
  for (std::size_t i : order) {
    const auto& t = tensors[i];
    if (t.begin != pos) {
      fail("'{}': tensor '{}' starts at byte {} of the data buffer, expected {} (offsets must be "
           "contiguous from 0)", f, detail::shown(t.name), t.begin, pos);
    }
    pos = t.end;
  }
  const std::uint64_t data_bytes = size - 8 - header_n;
  SPEED_CHECK(pos == data_bytes,
              "'{}': file is {} bytes, expected {} (8 + header {} + data {}): the tensors {} the data buffer",
              f, size, 8 + header_n + pos, header_n, pos, pos < data_bytes ? "do not fill" : "overrun");

  index.reserve(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) index.emplace(tensors[i].name, i);
}

SafeTensors::SafeTensors(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafeTensors::SafeTensors(SafeTensors&&) noexcept = default;
SafeTensors& SafeTensors::operator=(SafeTensors&&) noexcept = default;
SafeTensors::~SafeTensors() = default;

SafeTensors SafeTensors::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->label = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO must not block us
  if (fd < 0) {
    int err = errno;
    fail_hint(err == ENOENT ? "check the path" : "", "cannot open '{}': {}", path, std::strerror(err));
  }
  struct stat sb {};
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    fail("'{}' is not a regular file", path);
  }
  impl->size = static_cast<std::uint64_t>(sb.st_size);
  if (impl->size > 0) {
    void* m = mmap(nullptr, impl->size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    ::close(fd);
    SPEED_CHECK(m != MAP_FAILED, "cannot map '{}' ({} bytes): {}", path, impl->size, std::strerror(err));
    impl->map = m;
    impl->map_len = impl->size;
    impl->base = static_cast<const std::uint8_t*>(m);
  } else {
    ::close(fd);
  }
  impl->parse();
  return SafeTensors(std::move(impl));
}

SafeTensors SafeTensors::from_memory(std::string bytes, std::string label) {
  auto impl = std::make_unique<Impl>();
  impl->label = std::move(label);
  impl->owned = std::move(bytes);
  impl->base = reinterpret_cast<const std::uint8_t*>(impl->owned.data());
  impl->size = impl->owned.size();
  impl->parse();
  return SafeTensors(std::move(impl));
}

const std::string& SafeTensors::path() const { return impl_->label; }
std::uint64_t SafeTensors::file_size() const { return impl_->size; }
std::uint64_t SafeTensors::header_size() const { return impl_->header_n; }
std::string_view SafeTensors::header_json() const {
  return {reinterpret_cast<const char*>(impl_->base + 8), static_cast<std::size_t>(impl_->header_n)};
}
const std::vector<TensorInfo>& SafeTensors::tensors() const { return impl_->tensors; }

const TensorInfo* SafeTensors::find(std::string_view name) const {
  auto it = impl_->index.find(std::string(name));
  return it == impl_->index.end() ? nullptr : &impl_->tensors[it->second];
}

const TensorInfo& SafeTensors::at(std::string_view name) const {
  const TensorInfo* t = find(name);
  SPEED_CHECK(t != nullptr, "'{}' has no tensor '{}'", impl_->label, name);
  return *t;
}

const Metadata& SafeTensors::metadata() const { return impl_->metadata; }

const std::string* SafeTensors::metadata_value(std::string_view key) const {
  for (const auto& [k, v] : impl_->metadata) {
    if (k == key) return &v;
  }
  return nullptr;
}

const std::uint8_t* SafeTensors::data(const TensorInfo& t) const {
  return impl_->base + data_start() + t.begin;
}

void SafeTensors::release_pages(const TensorInfo& t) const {
  if (impl_->map == nullptr) return;
  static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto* p = data(t);
  const auto b = (reinterpret_cast<std::uintptr_t>(p) + page - 1) / page * page;
  const auto e = reinterpret_cast<std::uintptr_t>(p + t.nbytes()) / page * page;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

const std::uint8_t* SafeTensors::bytes() const { return impl_->base; }

}  // namespace speed
