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
#include <unordered_set>

#include <nlohmann/json.hpp>

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

// Thrown from inside the nlohmann parser callback; turned into a speed::Error with the label.
struct HeaderReject {
  std::string message;
};

const char* json_type_name(const nlohmann::ordered_json& j) {
  if (j.is_number_float()) return "float";
  if (j.is_number_integer() && !j.is_number_unsigned()) return "negative integer";
  return j.type_name();
}

// Printable, bounded rendering of a hostile string for messages.
std::string shown(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 200)) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  if (s.size() > 200) out += "...";
  return out;
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

namespace {

using Json = nlohmann::ordered_json;

std::uint64_t get_u64(const Json& v, const std::string& what) {
  if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<std::int64_t>() < 0)) {
    throw HeaderReject{fmt::format("{} must be a non-negative integer, got {} {}", what,
                                   json_type_name(v), shown(v.dump()))};
  }
  return v.get<std::uint64_t>();
}

}  // namespace

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

  // Duplicate keys: nlohmann silently keeps one of them, so track each object's keys while
  // parsing. The depth limit bounds recursion and allocation (a valid header nests at most
  // root object -> tensor object -> shape array), and the array limit bounds shape lengths.
  std::vector<std::unordered_set<std::string>> keys;
  std::size_t top_level = 0;
  std::size_t array_items = 0;
  auto callback = [&](int depth, Json::parse_event_t event, Json& parsed) -> bool {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (depth >= 3) throw HeaderReject{"header nests deeper than a safetensors header can"};
        if (event == Json::parse_event_t::object_start) keys.emplace_back();
        array_items = 0;
        break;
      case Json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case Json::parse_event_t::key: {
        const auto& k = parsed.get_ref<const std::string&>();
        if (keys.empty()) break;
        if (!keys.back().insert(k).second) {
          throw HeaderReject{depth <= 1 ? fmt::format("duplicate tensor name '{}'", shown(k))
                                        : fmt::format("duplicate key '{}' in a header object", shown(k))};
        }
        if (depth == 1 && ++top_level > kMaxTensors + 1) {
          throw HeaderReject{fmt::format("header lists more than {} tensors (limit kMaxTensors)",
                                         kMaxTensors)};
        }
        break;
      }
      case Json::parse_event_t::value:
        if (depth == 3 && ++array_items > kMaxRank) {
          throw HeaderReject{fmt::format("an array in the header has more than {} items (limit kMaxRank)",
                                         kMaxRank)};
        }
        break;
      default:
        break;
    }
    return true;
  };

  Json j;
  try {
    j = Json::parse(text, text + header_n, callback, /*allow_exceptions=*/true);
  } catch (const HeaderReject& e) {
    fail("'{}': {}", f, e.message);
  } catch (const nlohmann::json::exception& e) {
    fail("'{}': header is not valid UTF-8 JSON: {}", f, e.what());
  }
  SPEED_CHECK(j.is_object(), "'{}': header is a JSON {}, expected an object", f, j.type_name());

  try {
    tensors.reserve(j.size());
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      const Json& v = it.value();
      if (name == "__metadata__") {
        if (v.is_null()) continue;
        if (!v.is_object()) {
          throw HeaderReject{fmt::format("__metadata__ is a JSON {}, expected an object of strings",
                                         v.type_name())};
        }
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m->is_string()) {
            throw HeaderReject{fmt::format("__metadata__ value of '{}' is a JSON {}, expected a string",
                                           shown(m.key()), json_type_name(*m))};
          }
          metadata.emplace_back(m.key(), m->get<std::string>());
        }
        continue;
      }
      auto tname = fmt::format("tensor '{}'", shown(name));
      if (!v.is_object()) {
        throw HeaderReject{fmt::format("{} is a JSON {}, expected an object", tname, v.type_name())};
      }
      TensorInfo t;
      t.name = name;
      auto dt = v.find("dtype");
      if (dt == v.end()) throw HeaderReject{tname + " has no 'dtype'"};
      if (!dt->is_string()) {
        throw HeaderReject{fmt::format("{} dtype is a JSON {}, expected a string", tname, json_type_name(*dt))};
      }
      auto d = dtype_from_string(dt->get_ref<const std::string&>());
      if (!d) {
        throw HeaderReject{fmt::format("{} has unknown or unsupported dtype '{}'", tname,
                                       shown(dt->get_ref<const std::string&>()))};
      }
      t.dtype = *d;
      auto sh = v.find("shape");
      if (sh == v.end()) throw HeaderReject{tname + " has no 'shape'"};
      if (!sh->is_array()) {
        throw HeaderReject{fmt::format("{} shape is a JSON {}, expected an array", tname, sh->type_name())};
      }
      if (sh->size() > kMaxRank) {
        throw HeaderReject{fmt::format("{} has rank {}, more than the limit {} (kMaxRank)", tname,
                                       sh->size(), kMaxRank)};
      }
      std::uint64_t numel = 1;
      bool overflow = false;
      for (const auto& dim : *sh) {
        std::uint64_t n = get_u64(dim, tname + " shape entry");
        if (n > static_cast<std::uint64_t>(INT64_MAX)) overflow = true;
        t.shape.push_back(static_cast<std::int64_t>(n & static_cast<std::uint64_t>(INT64_MAX)));
        if (__builtin_mul_overflow(numel, n, &numel)) overflow = true;
      }
      std::uint64_t span = 0;
      if (overflow || numel > static_cast<std::uint64_t>(INT64_MAX) ||
          __builtin_mul_overflow(numel, dtype_size(t.dtype), &span)) {
        throw HeaderReject{fmt::format("{} shape {} overflows the element count", tname, shown(sh->dump()))};
      }
      auto off = v.find("data_offsets");
      if (off == v.end()) throw HeaderReject{tname + " has no 'data_offsets'"};
      if (!off->is_array() || off->size() != 2) {
        throw HeaderReject{fmt::format("{} data_offsets is {}, expected [begin, end]", tname, shown(off->dump()))};
      }
      t.begin = get_u64((*off)[0], tname + " data_offsets begin");
      t.end = get_u64((*off)[1], tname + " data_offsets end");
      if (t.end < t.begin) {
        throw HeaderReject{fmt::format("{} ends before it begins: data_offsets [{}, {}]", tname, t.begin, t.end)};
      }
      if (t.end - t.begin != span) {
        throw HeaderReject{fmt::format("{} spans {} bytes, expected {} (shape {} x {}, {} bytes each)",
                                       tname, t.end - t.begin, span, format_shape(t.shape),
                                       dtype_name(t.dtype), dtype_size(t.dtype))};
      }
      tensors.push_back(std::move(t));
    }
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
           "contiguous from 0)", f, shown(t.name), t.begin, pos);
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
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
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

const std::uint8_t* SafeTensors::bytes() const { return impl_->base; }

}  // namespace speed
