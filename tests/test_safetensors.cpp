// safetensors reader: every rejection rule of reference/formats.md §1.3 on crafted input, and
// the accepted forms (metadata, scalars, zero-size tensors, order, zero-copy pointers).
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include <catch2/catch.hpp>

#include "speed/error.h"
#include "speed/safetensors.h"

using speed::Dtype;
using speed::SafeTensors;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

namespace {

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file from a header text and a data buffer (N = header size unless given).
std::string file(const std::string& header, const std::string& data = {}, std::int64_t n = -1) {
  return le64(n < 0 ? header.size() : static_cast<std::uint64_t>(n)) + header + data;
}

SafeTensors parse(const std::string& bytes) { return SafeTensors::from_memory(bytes, "crafted.safetensors"); }

void rejects(const std::string& bytes, const std::string& what) {
  INFO("message should contain: " << what);
  bool threw = false;
  try {
    parse(bytes);
  } catch (const speed::Error& e) {
    threw = true;
    const std::string m = e.what();
    CAPTURE(m);
    CHECK_THAT(m, StartsWith("'crafted.safetensors': "));
    CHECK_THAT(m, Contains(what));
  }
  CHECK(threw);
}

const std::string k16(16, '\x01');

}  // namespace

TEST_CASE("safetensors: accepted files", "[unit]") {
  std::string data(16, '\0');
  for (int i = 0; i < 16; ++i) data[static_cast<std::size_t>(i)] = static_cast<char>(i);
  auto st = parse(file(R"({"__metadata__":{"format":"pt","z":"1"},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                       R"("a":{"dtype":"I32","shape":[],"data_offsets":[16,20]},"e":{"dtype":"F16","shape":[0,3],"data_offsets":[20,20]}})",
                       data + std::string("\x07\0\0\0", 4)));
  REQUIRE(st.tensors().size() == 3);
  // Header order is kept (not sorted by name).
  CHECK(st.tensors()[0].name == "b");
  CHECK(st.tensors()[1].name == "a");
  CHECK(st.tensors()[2].name == "e");
  CHECK(st.tensors()[1].shape.empty());
  CHECK(st.tensors()[1].numel() == 1);
  CHECK(st.tensors()[2].numel() == 0);
  CHECK(st.tensors()[2].nbytes() == 0);
  REQUIRE(st.metadata().size() == 2);
  CHECK(st.metadata()[0].first == "format");
  CHECK(st.metadata()[1].first == "z");
  REQUIRE(st.metadata_value("format") != nullptr);
  CHECK(*st.metadata_value("format") == "pt");
  CHECK(st.metadata_value("nope") == nullptr);
  const auto& b = st.at("b");
  CHECK(b.dtype == Dtype::F32);
  CHECK(std::memcmp(st.data(b), data.data(), 16) == 0);
  CHECK(st.data(b) == st.bytes() + st.data_start());  // zero-copy into the owned bytes
  std::int32_t a = 0;
  std::memcpy(&a, st.data(st.at("a")), 4);
  CHECK(a == 7);
  CHECK(st.find("missing") == nullptr);
  REQUIRE_THROWS_WITH(st.at("missing"), Contains("has no tensor 'missing'"));
  // Header order differing from data order is fine, and trailing spaces are padding.
  auto st2 = parse(file(R"({"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"y":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}   )", "ab"));
  CHECK(st2.data(st2.at("x"))[0] == 'b');
  CHECK(st2.header_json().size() == st2.header_size());
  // No tensors at all, metadata null.
  CHECK(parse(file("{}")).tensors().empty());
  CHECK(parse(file(R"({"__metadata__":null})")).metadata().empty());
  // Every dtype name round-trips with its size.
  for (const char* name : {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                           "F64", "I64", "U64"}) {
    auto d = speed::dtype_from_string(name);
    REQUIRE(d.has_value());
    CHECK(std::string(speed::dtype_name(*d)) == name);
  }
  CHECK(speed::dtype_size(Dtype::BF16) == 2);
  CHECK(speed::dtype_size(Dtype::I64) == 8);
  CHECK(speed::format_shape({320, 768}) == "[320, 768]");
}

TEST_CASE("safetensors: container-level rejections", "[unit]") {
  rejects(std::string("\x05\x00\x00", 3), "file is 3 bytes, expected at least 8");
  rejects(le64(100'000'001) + "{}", "header length 100000001 exceeds the limit of 100000000 bytes");
  rejects(file("{}", "", 50), "header length 50 runs past the end of the file (8 + 50 > 10 bytes)");
  rejects(file(" "), "too small for a JSON object");
  const std::string one = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  rejects(file(one, "xyz"), fmt::format("file is {} bytes, expected {} (8 + header {} + data 1): the tensors do not "
                                        "fill the data buffer", 8 + one.size() + 3, 8 + one.size() + 1, one.size()));
  rejects(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "xy"), "the tensors overrun the data buffer");
}

TEST_CASE("safetensors: JSON-level rejections", "[unit]") {
  rejects(file("{\"a\xff\":1}"), "not valid UTF-8 JSON");
  rejects(file("{\"a\":"), "not valid UTF-8 JSON");
  rejects(file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x)", "a"), "not valid UTF-8 JSON");
  rejects(file("[1, 2]"), "header is a JSON array, expected an object");
  rejects(file("17"), "header is a JSON integer, expected an object");
  rejects(file(R"({"t":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}})", "x"), "tensor 't': header nests deeper");
  rejects(file(R"({"t":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}})", "x"),
          "tensor 't' shape entry must be a non-negative integer, got string");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "x"), "data_offsets has more than 2 entries");
  rejects(file(R"({"__metadata__":{"k":1}})"), "__metadata__ value of 'k' is a JSON integer, expected a string");
  rejects(file(R"({"__metadata__":{"k":{"x":"y"}}})"), "__metadata__ value of 'k' is a JSON object, expected a string");
  rejects(file(R"({"__metadata__":["a"]})"), "__metadata__ is a JSON array, expected an object of strings");
  rejects(file(R"({"t":[1]})"), "tensor 't' is a JSON array, expected an object");
  rejects(file(R"({"a":{"x":{"y":{"z":1}}}})"), "tensor 'a': header nests deeper than a safetensors header can");
  rejects(file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xy"),
          "duplicate tensor name 'a'");
  rejects(file(R"({"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "x"),
          "duplicate key 'dtype' in a header object");
  rejects(file(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key 'k' in a header object");
  rejects(file(R"({"__metadata__":{},"__metadata__":{}})"), "duplicate tensor name '__metadata__'");
}

TEST_CASE("safetensors: tensor-entry rejections", "[unit]") {
  rejects(file(R"({"t":{"shape":[1],"data_offsets":[0,1]}})", "x"), "tensor 't' has no 'dtype'");
  rejects(file(R"({"t":{"dtype":"U8","data_offsets":[0,1]}})", "x"), "tensor 't' has no 'shape'");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1]}})", "x"), "tensor 't' has no 'data_offsets'");
  rejects(file(R"({"t":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", "x"), "tensor 't' dtype is a JSON integer, expected a string");
  rejects(file(R"({"t":{"dtype":"F99","shape":[1],"data_offsets":[0,1]}})", "x"), "tensor 't' has unknown or unsupported dtype 'F99'");
  rejects(file(R"({"t":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", "x"), "unknown or unsupported dtype 'F4'");
  rejects(file(R"({"t":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x"), "tensor 't' shape is a JSON string, expected an array");
  rejects(file(R"({"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "x"),
          "tensor 't' shape entry must be a non-negative integer, got negative integer -1");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", "x"),
          "tensor 't' shape entry must be a non-negative integer, got float 1.5");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "x"), "tensor 't' data_offsets has 1 entries, expected [begin, end]");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":"0,1"}})", "x"), "expected [begin, end]");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,-1]}})", "x"),
          "tensor 't' data_offsets entry must be a non-negative integer, got negative integer -1");
  rejects(file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}})", "xxxx"),
          "tensor 't' shape [4294967296,4294967296,16] overflows the element count");
  rejects(file(R"({"t":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", "xxxxxxxx"),
          "overflows the element count");
  rejects(file(R"({"t":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}})", "x"),
          "tensor 't' has more than 16 dimensions (limit kMaxRank)");
  rejects(file(R"({"t":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}})", "xxxx"), "tensor 't' ends before it begins: data_offsets [4, 0]");
  rejects(file(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}})", "xxxxxxxx"),
          "tensor 't' spans 8 bytes, expected 16 (shape [2, 2] x F32, 4 bytes each)");
}

TEST_CASE("safetensors: offset tiling rejections", "[unit]") {
  rejects(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", std::string(8, 'x')),
          "tensor 'a' starts at byte 4 of the data buffer, expected 0 (offsets must be contiguous from 0)");
  rejects(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}})",
               std::string(12, 'x')),
          "tensor 'b' starts at byte 8 of the data buffer, expected 4");
  rejects(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
               std::string(6, 'x')),
          "tensor 'b' starts at byte 2 of the data buffer, expected 4");
  rejects(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
               std::string(4, 'x')),
          "starts at byte 0 of the data buffer, expected 4");
}

TEST_CASE("safetensors: tensor-count limit", "[unit]") {
  // One more entry than kMaxTensors (+ __metadata__) is refused while parsing, before the
  // entries are even validated, so memory stays bounded.
  std::string h = "{";
  h.reserve(60 * (speed::kMaxTensors + 3));
  for (std::size_t i = 0; i < speed::kMaxTensors + 2; ++i) {
    h += fmt::format(R"("{}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}},)", i);
  }
  h.back() = '}';
  rejects(file(h), "header lists more than 1000000 tensors (limit kMaxTensors)");
}

TEST_CASE("safetensors: release_pages keeps the bytes, mapped or in memory", "[unit][golden]") {
  const std::string path = std::string(SPEED_SHARED_DIR) + "/golden/fixture_tiny_f32.safetensors";
  const auto st = SafeTensors::open(path);
  const auto& emb = st.at("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight");
  REQUIRE(emb.nbytes() > 3 * 4096);  // spans whole pages
  const std::string before(reinterpret_cast<const char*>(st.data(emb)), emb.nbytes());
  st.release_pages(emb);  // the mapping: pages dropped, read back from the file
  CHECK(std::string(reinterpret_cast<const char*>(st.data(emb)), emb.nbytes()) == before);
  std::ifstream in(path, std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto mem = SafeTensors::from_memory(file, "copy");
  const auto& e2 = mem.at(emb.name);
  mem.release_pages(e2);  // in memory: a no-op (MADV_DONTNEED would zero anonymous pages)
  CHECK(std::string(reinterpret_cast<const char*>(mem.data(e2)), e2.nbytes()) == before);
}

TEST_CASE("safetensors: mmap the golden fixture", "[unit][golden]") {
  const std::string path = std::string(SPEED_SHARED_DIR) + "/golden/fixture_tiny_f32.safetensors";
  auto st = SafeTensors::open(path);
  CHECK(st.path() == path);
  CHECK(st.file_size() == 18721700);
  CHECK(st.header_size() % 8 == 0);
  CHECK(st.tensors().size() == 263);
  REQUIRE(!st.metadata().empty());
  CHECK(st.metadata()[0] == std::make_pair(std::string("format"), std::string("pt")));
  const auto& emb = st.at("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight");
  CHECK(emb.dtype == Dtype::F16);
  CHECK(emb.shape == std::vector<std::int64_t>{49408, 128});
  CHECK(st.at("model_ema.num_updates").dtype == Dtype::I32);
  CHECK(st.at("model_ema.num_updates").shape.empty());
  CHECK(st.at("extra.passthrough_bf16").dtype == Dtype::BF16);
  const auto& ids = st.at("cond_stage_model.transformer.text_model.embeddings.position_ids");
  std::int64_t last = -1;
  std::memcpy(&last, st.data(ids) + 76 * 8, 8);
  CHECK(last == 76);
  REQUIRE_THROWS_WITH(SafeTensors::open("/nonexistent/x.safetensors"),
                      Contains("cannot open '/nonexistent/x.safetensors': No such file or directory"));
  REQUIRE_THROWS_WITH(SafeTensors::open(SPEED_SHARED_DIR), Contains("is not a regular file"));
  // A FIFO is refused without blocking on open().
  char dir[] = "/tmp/speed-fifo-XXXXXX";
  REQUIRE(::mkdtemp(dir) != nullptr);
  const std::string fifo = std::string(dir) + "/model.safetensors";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  REQUIRE_THROWS_WITH(SafeTensors::open(fifo), Contains("is not a regular file"));
  ::unlink(fifo.c_str());
  ::rmdir(dir);
}
