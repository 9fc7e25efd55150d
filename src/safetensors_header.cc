// The safetensors header as a stream of SAX events, validated as it is read.
#include "safetensors_header.h"

#include <unordered_set>

#include <nlohmann/json.hpp>

#include "speed/error.h"

namespace speed::detail {

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

namespace {

using Json = nlohmann::json;

[[noreturn]] void reject(std::string m) { throw HeaderReject{std::move(m)}; }

// depth: 0 outside the root, 1 inside the root object, 2 inside a tensor entry / __metadata__,
// 3 inside a shape / data_offsets array. Nothing deeper exists in a valid header.
class Handler : public nlohmann::json_sax<Json> {
 public:
  Handler(std::vector<TensorInfo>& tensors, Metadata& metadata) : tensors_(tensors), metadata_(metadata) {}

  bool null() override { return scalar("null"); }
  bool boolean(bool) override { return scalar("boolean"); }
  bool number_integer(number_integer_t v) override {
    if (v >= 0) return number_unsigned(static_cast<number_unsigned_t>(v));
    return number("negative integer", fmt::format("{}", v), 0, false);
  }
  bool number_unsigned(number_unsigned_t v) override { return number("integer", fmt::format("{}", v), v, true); }
  bool number_float(number_float_t, const string_t& s) override { return number("float", s, 0, false); }
  bool binary(binary_t&) override { return scalar("binary"); }

  bool string(string_t& v) override {
    if (depth_ == 2 && in_meta_) {
      metadata_.emplace_back(meta_key_, std::move(v));
      return true;
    }
    if (depth_ == 2 && field_ == Field::Dtype) {
      auto d = dtype_from_string(v);
      if (!d) reject(fmt::format("{} has unknown or unsupported dtype '{}'", tname(), shown(v)));
      entry_.dtype = *d;
      has_dtype_ = true;
      return true;
    }
    return scalar("string");
  }

  bool start_object(std::size_t) override {
    if (depth_ == 1) {
      if (top_ == "__metadata__") {
        in_meta_ = true;
        meta_keys_.clear();
      } else {
        entry_ = TensorInfo{};
        entry_.name = top_;
        has_dtype_ = has_shape_ = has_offsets_ = false;
        fields_.clear();
        field_ = array_ = Field::Other;
      }
    } else if (depth_ >= 2) {
      container("object");
    }
    ++depth_;
    return true;
  }

  bool end_object() override {
    --depth_;
    if (depth_ == 1) {
      if (in_meta_) {
        in_meta_ = false;
      } else {
        finish_entry();
      }
    }
    if (depth_ == 2) skip_ = false;
    return true;
  }

  bool start_array(std::size_t) override {
    if (depth_ == 0) reject("header is a JSON array, expected an object");
    if (depth_ == 1) reject(top_ == "__metadata__" ? "__metadata__ is a JSON array, expected an object of strings"
                                                   : fmt::format("{} is a JSON array, expected an object", tname()));
    if (depth_ == 2 && !in_meta_ && (field_ == Field::Shape || field_ == Field::Offsets)) {
      items_ = 0;
      array_ = field_;
      ++depth_;
      return true;
    }
    container("array");
    ++depth_;
    return true;
  }

  bool end_array() override {
    --depth_;
    if (depth_ == 2 && array_ == Field::Shape) has_shape_ = true;
    if (depth_ == 2 && array_ == Field::Offsets) {
      if (items_ != 2) reject(fmt::format("{} data_offsets has {} entries, expected [begin, end]", tname(), items_));
      has_offsets_ = true;
    }
    if (depth_ == 2) {
      array_ = Field::Other;
      skip_ = false;
    }
    return true;
  }

  bool key(string_t& k) override {
    if (depth_ == 1) {
      if (!names_.insert(k).second) reject(fmt::format("duplicate tensor name '{}'", shown(k)));
      if (names_.size() > kMaxTensors + 1) {
        reject(fmt::format("header lists more than {} tensors (limit kMaxTensors)", kMaxTensors));
      }
      top_ = std::move(k);
      return true;
    }
    if (depth_ == 2 && in_meta_) {
      if (!meta_keys_.insert(k).second) reject(fmt::format("duplicate key '{}' in a header object", shown(k)));
      meta_key_ = std::move(k);
      return true;
    }
    if (depth_ == 2) {
      if (!fields_.insert(k).second) reject(fmt::format("duplicate key '{}' in a header object", shown(k)));
      field_ = k == "dtype" ? Field::Dtype : k == "shape" ? Field::Shape : k == "data_offsets" ? Field::Offsets : Field::Other;
      return true;
    }
    return true;  // keys of ignored objects (depth 3 is bounded by container())
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
    reject(fmt::format("header is not valid UTF-8 JSON: {}", ex.what()));
  }

 private:
  enum class Field { Dtype, Shape, Offsets, Other };

  std::string tname() const { return fmt::format("tensor '{}'", shown(top_)); }

  // A container where only scalars are allowed (or inside an ignored field).
  void container(const char* type) {
    if (depth_ >= 3) reject(fmt::format("{}: header nests deeper than a safetensors header can", tname()));
    if (in_meta_) reject(fmt::format("__metadata__ value of '{}' is a JSON {}, expected a string", shown(meta_key_), type));
    if (field_ == Field::Dtype) reject(fmt::format("{} dtype is a JSON {}, expected a string", tname(), type));
    if (field_ == Field::Shape) reject(fmt::format("{} shape is a JSON {}, expected an array", tname(), type));
    if (field_ == Field::Offsets) reject(fmt::format("{} data_offsets is a JSON {}, expected [begin, end]", tname(), type));
    skip_ = true;  // an unknown field holding a container: ignored, as the reference does
  }

  bool scalar(const char* type) {
    if (depth_ == 0) reject(fmt::format("header is a JSON {}, expected an object", type));
    if (depth_ == 1) {
      if (top_ == "__metadata__") {
        if (std::string_view(type) == "null") return true;
        reject(fmt::format("__metadata__ is a JSON {}, expected an object of strings", type));
      }
      reject(fmt::format("{} is a JSON {}, expected an object", tname(), type));
    }
    if (depth_ == 2 && in_meta_) {
      reject(fmt::format("__metadata__ value of '{}' is a JSON {}, expected a string", shown(meta_key_), type));
    }
    if (depth_ == 2 && !skip_) {
      if (field_ == Field::Dtype) reject(fmt::format("{} dtype is a JSON {}, expected a string", tname(), type));
      if (field_ == Field::Shape) reject(fmt::format("{} shape is a JSON {}, expected an array", tname(), type));
      if (field_ == Field::Offsets) reject(fmt::format("{} data_offsets is a JSON {}, expected [begin, end]", tname(), type));
    }
    if (depth_ == 3 && array_ != Field::Other) {
      reject(fmt::format("{} {} entry must be a non-negative integer, got {}", tname(),
                         array_ == Field::Shape ? "shape" : "data_offsets", type));
    }
    return true;
  }

  bool number(const char* type, const std::string& text, std::uint64_t v, bool ok) {
    if (depth_ != 3 || array_ == Field::Other) return scalar(type);
    if (!ok) {
      reject(fmt::format("{} {} entry must be a non-negative integer, got {} {}", tname(),
                         array_ == Field::Shape ? "shape" : "data_offsets", type, shown(text)));
    }
    if (array_ == Field::Shape) {
      if (++items_ > kMaxRank) reject(fmt::format("{} has more than {} dimensions (limit kMaxRank)", tname(), kMaxRank));
      if (v > static_cast<std::uint64_t>(INT64_MAX)) overflow_ = true;
      shape_.push_back(v);
      entry_.shape.push_back(static_cast<std::int64_t>(v & static_cast<std::uint64_t>(INT64_MAX)));
    } else {
      if (++items_ > 2) reject(fmt::format("{} data_offsets has more than 2 entries, expected [begin, end]", tname()));
      (items_ == 1 ? entry_.begin : entry_.end) = v;
    }
    return true;
  }

  void finish_entry() {
    const std::string t = tname();
    if (!has_dtype_) reject(t + " has no 'dtype'");
    if (!has_shape_) reject(t + " has no 'shape'");
    if (!has_offsets_) reject(t + " has no 'data_offsets'");
    std::uint64_t numel = 1, span = 0;
    bool overflow = overflow_;
    for (std::uint64_t d : shape_) overflow = overflow || __builtin_mul_overflow(numel, d, &numel);
    if (overflow || numel > static_cast<std::uint64_t>(INT64_MAX) ||
        __builtin_mul_overflow(numel, dtype_size(entry_.dtype), &span)) {
      reject(fmt::format("{} shape [{}] overflows the element count", t, fmt::join(shape_, ",")));
    }
    if (entry_.end < entry_.begin) {
      reject(fmt::format("{} ends before it begins: data_offsets [{}, {}]", t, entry_.begin, entry_.end));
    }
    if (entry_.end - entry_.begin != span) {
      reject(fmt::format("{} spans {} bytes, expected {} (shape {} x {}, {} bytes each)", t, entry_.end - entry_.begin,
                         span, format_shape(entry_.shape), dtype_name(entry_.dtype), dtype_size(entry_.dtype)));
    }
    tensors_.push_back(std::move(entry_));
    shape_.clear();
    overflow_ = false;
  }

  std::vector<TensorInfo>& tensors_;
  Metadata& metadata_;
  int depth_ = 0;
  std::string top_, meta_key_;
  bool in_meta_ = false, skip_ = false;
  Field field_ = Field::Other, array_ = Field::Other;
  std::size_t items_ = 0;
  TensorInfo entry_;
  std::vector<std::uint64_t> shape_;
  bool overflow_ = false, has_dtype_ = false, has_shape_ = false, has_offsets_ = false;
  std::unordered_set<std::string> names_, meta_keys_, fields_;
};

}  // namespace

void parse_header_json(const char* text, std::size_t n, std::vector<TensorInfo>& tensors, Metadata& metadata) {
  Handler h(tensors, metadata);
  Json::sax_parse(text, text + n, &h, nlohmann::detail::input_format_t::json, /*strict=*/true);
}

}  // namespace speed::detail
