// The bad-input matrix (SPEC §3, §6; formats.md §1.3) as e2e tests of the real binary: every
// damaged checkpoint, concept file and preset is refused with exit status 1 or 2 and one
// `error:` line naming the file/tensor/limit, writes nothing, leaves no temp file and never
// touches its input. Crafted inputs are copies of the tiny fixture with header bytes changed.
#include <ATen/ATen.h>

#include "test_app_badinput_util.h"

#include <cmath>
#include <cstring>
#include <limits>

using namespace badinput;

namespace {

struct BadFile {
  std::string what;
  std::string bytes;
  std::string substring;
};

// Header edits: `edit` changes the ordered header JSON, the data buffer stays as it is.
template <typename F>
std::string edited_header(F edit) {
  OJson j = fixture().json;
  edit(j);
  return assemble(j.dump(), fixture().data);
}

std::vector<BadFile> damaged_files() {
  const Parts& fx = fixture();
  const std::string& b = fx.bytes;
  const std::string some = tensor_named("encoder.layers.0.layer_norm1.bias");  // F32 [128]
  std::vector<BadFile> v;

  v.push_back({"shorter than the length field", b.substr(0, 5), "file is 5 bytes, expected at least 8"});
  v.push_back({"truncated in the data", b.substr(0, b.size() / 2), "the tensors overrun the data buffer"});
  v.push_back({"truncated in the header", b.substr(0, 8 + fx.header.size() / 2), "runs past the end of the file"});
  v.push_back({"trailing bytes after the data", b + "junk", "the tensors do not fill the data buffer"});
  v.push_back({"header length beyond the file", le64_bytes(b.size()) + b.substr(8), "runs past the end of the file"});
  v.push_back({"header length over 100 MB (declared)", le64_bytes(200'000'000) + b.substr(8),
               "header length 200000000 exceeds the limit of 100000000 bytes"});
  v.push_back({"header length 2^64-1", le64_bytes(std::numeric_limits<std::uint64_t>::max()) + b.substr(8),
               "exceeds the limit of 100000000 bytes"});
  v.push_back({"header length 0", le64_bytes(0) + b.substr(8), "too small for a JSON object"});

  std::string h = fx.header;
  h[h.rfind('}')] = ' ';  // unterminated object
  v.push_back({"invalid JSON", le64_bytes(h.size()) + h + fx.data, "header is not valid UTF-8 JSON"});
  h = fx.header;
  h[0] = '[';
  h[h.rfind('}')] = ']';
  v.push_back({"JSON array instead of an object", le64_bytes(h.size()) + h + fx.data, "header is a JSON array, expected an object"});
  h = fx.header;
  h[h.find("middle_block") + 3] = '\xff';
  v.push_back({"invalid UTF-8 in a tensor name", le64_bytes(h.size()) + h + fx.data, "not valid UTF-8"});

  v.push_back({"non-string metadata value", edited_header([](OJson& j) { j["__metadata__"]["format"] = 1; }),
               "__metadata__ value of 'format' is a JSON integer, expected a string"});
  v.push_back({"nested metadata object", edited_header([](OJson& j) { j["__metadata__"]["x"] = OJson::object(); }),
               "__metadata__ value of 'x' is a JSON object, expected a string"});
  v.push_back({"metadata that is an array", edited_header([](OJson& j) { j["__metadata__"] = OJson::array(); }),
               "__metadata__ is a JSON array"});
  v.push_back({"unknown dtype", edited_header([&](OJson& j) { j[some]["dtype"] = "F17"; }),
               "tensor '" + some + "' has unknown or unsupported dtype 'F17'"});
  v.push_back({"dtype not a string", edited_header([&](OJson& j) { j[some]["dtype"] = 4; }),
               "tensor '" + some + "' dtype is a JSON integer, expected a string"});
  v.push_back({"missing data_offsets", edited_header([&](OJson& j) { j[some].erase("data_offsets"); }),
               "tensor '" + some + "' has no 'data_offsets'"});
  v.push_back({"overlapping offsets", edited_header([&](OJson& j) {
                 auto& o = j[some]["data_offsets"];
                 o = OJson::array({o[0].get<std::uint64_t>() - 4, o[1].get<std::uint64_t>() - 4});
               }),
               "tensor '" + some + "' starts at byte"});
  v.push_back({"gapped offsets", edited_header([&](OJson& j) {
                 auto& o = j[some]["data_offsets"];
                 o = OJson::array({o[0].get<std::uint64_t>() + 4, o[1].get<std::uint64_t>() + 4});
               }),
               "(offsets must be contiguous from 0)"});
  v.push_back({"offsets out of range (2^40 past the data)", edited_header([&](OJson& j) {
                 auto& o = j[some]["data_offsets"];
                 o = OJson::array({o[0].get<std::uint64_t>() + (1ull << 40), o[1].get<std::uint64_t>() + (1ull << 40)});
               }),
               // Checked in offset order, as the reference reader: the hole is reported at the
               // tensor that should have filled it.
               "(offsets must be contiguous from 0)"});
  v.push_back({"end before begin", edited_header([&](OJson& j) {
                 auto& o = j[some]["data_offsets"];
                 o = OJson::array({o[1], o[0]});
               }),
               "tensor '" + some + "' ends before it begins"});
  v.push_back({"negative offset", edited_header([&](OJson& j) { j[some]["data_offsets"][0] = -8; }),
               "data_offsets entry must be a non-negative integer"});
  v.push_back({"span != numel x itemsize", edited_header([&](OJson& j) { j[some]["shape"] = OJson::array({129}); }),
               "tensor '" + some + "' spans 512 bytes, expected 516 (shape [129] x F32, 4 bytes each)"});
  v.push_back({"shape whose element count overflows", edited_header([&](OJson& j) {
                 j[some]["shape"] = OJson::array({1ull << 32, 1ull << 32, 4});
               }),
               "overflows the element count"});
  v.push_back({"shape whose byte count overflows", edited_header([&](OJson& j) {
                 j[some]["shape"] = OJson::array({1ull << 62});
               }),
               "overflows the element count"});
  v.push_back({"rank beyond the limit", edited_header([&](OJson& j) {
                 j[some]["shape"] = OJson(std::vector<int>(17, 1));
               }),
               "has more than 16 dimensions (limit kMaxRank)"});

  // Duplicate names: the second entry takes the first tensor's name (JSON objects cannot hold
  // that, so the text is assembled entry by entry).
  std::vector<std::pair<std::string, std::string>> entries;
  std::string first;
  for (const auto& [k, e] : fx.json.items()) {
    std::string name = k;
    if (k != "__metadata__") {
      if (first.empty()) {
        first = k;
      } else if (entries.size() == 2) {
        name = first;
      }
    }
    entries.emplace_back(name, e.dump());
  }
  v.push_back({"duplicate tensor names", assemble(header_text(entries), fx.data), "duplicate tensor name '" + first + "'"});
  return v;
}

}  // namespace

TEST_CASE("bad input: damaged safetensors files are refused, nothing written", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "bad.safetensors";
  const fs::path output = tmp.out() / "edited.safetensors";
  for (const BadFile& c : damaged_files()) {
    SECTION(c.what) {
      spit(model, c.bytes);
      INFO("case: " << c.what);
      expect_refused(cat(erase_args(model, output), {"--concept", "Pikachu"}), {1, c.substring}, output,
                     {tmp.in(), tmp.out()}, tmp.io());
      // `inspect` reads through the same validating reader.
      Run r = run({"inspect", model.string()}, tmp.io());
      CHECK(r.rc == 1);
      check_error_lines(r.err, c.substring);
    }
  }
}

TEST_CASE("bad input: resource limits are checked before allocating", "[e2e]") {
  TempDir tmp;
  const fs::path output = tmp.out() / "edited.safetensors";

  SECTION("more tensors than kMaxTensors (1,000,000) in a header under 100 MB") {
    // 1,000,002 empty U8 tensors: a 58 MB header, refused while it is being parsed.
    std::string h = "{";
    h.reserve(60'000'000);
    for (int i = 0; i < 1'000'002; ++i) {
      if (i) h += ',';
      h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}";
    }
    h += "}";
    REQUIRE(h.size() < 100'000'000);
    const fs::path model = tmp.in() / "many.safetensors";
    spit(model, assemble(h, ""));
    expect_refused(cat(erase_args(model, output), {"--concept", "Pikachu"}),
                   {1, "header lists more than 1000000 tensors (limit kMaxTensors)"}, output,
                   {tmp.in(), tmp.out()}, tmp.io());
  }

  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  const auto base = erase_args(model, output);

  SECTION("more than kMaxConcepts (100,000) concepts") {
    std::string text;
    for (int i = 0; i <= 100'000; ++i) text += "concept " + std::to_string(i) + "\n";
    spit(tmp.in() / "many.txt", text);
    expect_refused(cat(base, {"--concepts", (tmp.in() / "many.txt").string()}),
                   {1, "has more than 100000 concepts"}, output, {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("a concept line over kMaxConceptLineBytes (16384)") {
    spit(tmp.in() / "long.txt", "Pikachu\n" + std::string(20000, 'a') + "\n");
    expect_refused(cat(base, {"--concepts", (tmp.in() / "long.txt").string()}),
                   {1, "line 2 is 20000 bytes long, the limit is 16384"}, output, {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("a concept file over kMaxConceptFileBytes (64 MiB), read no further") {
    const fs::path big = tmp.in() / "big.txt";
    spit(big, "Pikachu\n");
    fs::resize_file(big, (64u << 20) + 1);  // sparse: costs no disk
    expect_refused(cat(base, {"--concepts", big.string()}), {1, "is larger than the limit of 67108864 bytes"},
                   output, {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("a CSV row with more than kMaxCsvColumns (1024) fields") {
    std::string row;
    for (int i = 0; i < 1100; ++i) row += (i ? ",c" : "c") + std::to_string(i);
    spit(tmp.in() / "wide.csv", row + "\n");
    expect_refused(cat(base, {"--concept", "Pikachu", "--retain", (tmp.in() / "wide.csv").string() + ":c0"}),
                   {1, "line 1 has more than 1024 fields"}, output, {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("more than kMaxConcepts retain rows in a CSV") {
    std::string csv = "concept\n";
    for (int i = 0; i <= 100'000; ++i) csv += "r" + std::to_string(i) + "\n";
    spit(tmp.in() / "rows.csv", csv);
    expect_refused(cat(base, {"--concept", "Pikachu", "--retain", (tmp.in() / "rows.csv").string() + ":concept"}),
                   {1, "has more than 100000 rows"}, output, {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("a preset over 1 MiB") {
    spit(tmp.in() / "big.json", "{\"description\": \"" + std::string(1u << 20, 'x') + "\"}");
    expect_refused(cat(base, {"--concept", "Pikachu", "--preset", (tmp.in() / "big.json").string()}),
                   {1, "is larger than 1048576 bytes"}, output, {tmp.in(), tmp.out()}, tmp.io());
  }
}

TEST_CASE("bad input: checkpoints that parse but cannot be edited", "[e2e]") {
  TempDir tmp;
  const Parts& fx = fixture();
  const fs::path model = tmp.in() / "model.safetensors";
  const fs::path output = tmp.out() / "edited.safetensors";
  const auto base = erase_args(model, output);

  SECTION("no cross-attention K/V layers") {
    OJson j;
    for (const auto& [k, e] : fx.json.items()) {
      std::string name = k;
      for (const char* p : {"attn2.to_k.", "attn2.to_v."}) {
        if (auto at = name.find(p); at != std::string::npos) name.insert(at + std::strlen(p) - 1, "_renamed");
      }
      j[name] = e;
    }
    spit(model, assemble(j.dump(), fx.data));
    expect_refused(cat(base, {"--concept", "Pikachu"}), {1, "no cross-attention K/V tensors found in"}, output,
                   {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("a text-encoder tensor with the wrong shape") {
    const std::string fc1 = tensor_named("encoder.layers.0.mlp.fc1.weight");  // [512, 128]
    OJson j = fx.json;
    j[fc1]["shape"] = OJson::array({128, 512});  // same bytes, transposed shape
    spit(model, assemble(j.dump(), fx.data));
    expect_refused(cat(base, {"--concept", "Pikachu"}), {1, "tensor '" + fc1 + "' has shape [128, 512], expected"},
                   output, {tmp.in(), tmp.out()}, tmp.io());
  }
  SECTION("a UNet K/V tensor with the wrong width") {
    const std::string tov = tensor_named("attn2.to_v.weight");  // [32, 128]
    OJson j = fx.json;
    j[tov]["shape"] = OJson::array({64, 64});
    spit(model, assemble(j.dump(), fx.data));
    Run r = expect_refused(cat(base, {"--concept", "Pikachu"}), {1, "[64, 64]"}, output, {tmp.in(), tmp.out()}, tmp.io());
    CHECK_THAT(r.err, Catch::Contains("attn2.to_v.weight"));
  }

  // NaN/Inf in a weight that is edited: refused, naming the tensor as the file spells it (the
  // edit would spread the NaN over the whole layer). Values in other tensors are copied as they
  // are: safetensors does not validate values, and neither do we.
  auto poisoned = [&](const std::string& name, float value) {
    std::string data = fx.data;
    const auto off = fx.json[name]["data_offsets"][0].get<std::size_t>() + 4 * 7;
    std::memcpy(&data[off], &value, 4);
    return assemble(fx.header, data);  // the header bytes verbatim (already padded)
  };
  const std::string tov = tensor_named("attn2.to_v.weight");
  const std::string tok = tensor_named("attn2.to_k.weight");
  SECTION("NaN in an edited weight") {
    spit(model, poisoned(tov, std::numeric_limits<float>::quiet_NaN()));
    Run r = expect_refused(cat(base, {"--concept", "Pikachu"}), {1, "contains non-finite values"}, output,
                           {tmp.in(), tmp.out()}, tmp.io());
    CHECK_THAT(r.err, Catch::Contains("'" + tov + "'"));
  }
  SECTION("+Inf in an edited key weight (--params kv), every format") {
    spit(model, poisoned(tok, std::numeric_limits<float>::infinity()));
    for (const char* format : {"full", "edited", "pt", "lora"}) {
      Run r = expect_refused(cat(base, {"--concept", "Pikachu", "--params", "kv", "--format", format}),
                             {1, "contains non-finite values"}, output, {tmp.in(), tmp.out()}, tmp.io());
      CHECK_THAT(r.err, Catch::Contains("'" + tok + "'"));
    }
  }
  SECTION("NaN in a weight that is not edited is copied through") {
    spit(model, poisoned(tok, std::numeric_limits<float>::quiet_NaN()));
    Run r = run(cat(base, {"--concept", "Pikachu", "--params", "v"}), tmp.io());
    INFO("stderr:\n" << r.err);
    REQUIRE(r.rc == 0);
    CHECK(fs::exists(output));
  }
}

TEST_CASE("bad input: concept files, retain sets and presets", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  const fs::path output = tmp.out() / "edited.safetensors";
  const auto base = erase_args(model, output);
  const std::vector<fs::path> watched = {tmp.in(), tmp.out()};
  auto file = [&](const std::string& name, const std::string& text) {
    spit(tmp.in() / name, text);
    return (tmp.in() / name).string();
  };

  SECTION("a concept file that is not UTF-8") {
    std::string f = file("latin1.txt", "Pikachu\nPok\xe9mon\n");
    expect_refused(cat(base, {"--concepts", f}), {1, "file '" + f + "' line 2 is not valid UTF-8"}, output, watched, tmp.io());
  }
  SECTION("a retain CSV that is not UTF-8") {
    std::string f = file("retain.csv", "concept\nMickey\n\xc3\x28\n");
    expect_refused(cat(base, {"--concept", "Pikachu", "--retain", f + ":concept"}), {1, "is not valid UTF-8"}, output,
                   watched, tmp.io());
  }
  SECTION("a concept file with comments only") {
    std::string f = file("empty.txt", "# nothing to erase\n\n   \n");
    expect_refused(cat(base, {"--concepts", f}), {1, "has no concepts"}, output, watched, tmp.io());
  }
  SECTION("an empty concept file") {
    std::string f = file("zero.txt", "");
    expect_refused(cat(base, {"--concepts", f}), {1, "has no concepts"}, output, watched, tmp.io());
  }
  SECTION("no target at all") {
    expect_refused(base, {2, "no target concept"}, output, watched, tmp.io());
  }
  SECTION("a target repeated (case-insensitively)") {
    expect_refused(cat(base, {"--concept", "Pikachu", "--concept", "pikachu"}), {2, "repeats target 'Pikachu'"}, output,
                   watched, tmp.io());
  }
  SECTION("anchor count matching neither 1 nor N") {
    expect_refused(cat(base, {"--concept", "a", "--concept", "b", "--concept", "c", "--anchor", "x", "--anchor", "y"}),
                   {2, "2 anchors for 3 targets, expected 1 or 3"}, output, watched, tmp.io());
  }
  SECTION("a retain list emptied by the target filter") {
    std::string f = file("retain.txt", "Pikachu\nA PIKACHU plush\npikachu, detailed\n");
    expect_refused(cat(base, {"--concept", "Pikachu", "--retain", f}),
                   {1, "every one of the 3 retain texts contains a target as a whole word"}, output, watched, tmp.io());
  }
  SECTION("a CSV column that does not exist") {
    std::string f = file("retain.csv", "concept\nMickey\n");
    expect_refused(cat(base, {"--concept", "Pikachu", "--retain", f + ":name"}), {2, "has no column 'name'"}, output,
                   watched, tmp.io());
  }
  SECTION("a CSV with an unterminated quote") {
    std::string f = file("retain.csv", "concept\n\"Mickey\nMinnie\n");
    expect_refused(cat(base, {"--concept", "Pikachu", "--retain", f + ":concept"}), {1, "a quoted field is not closed"},
                   output, watched, tmp.io());
  }
  SECTION("an empty null space, and the flag that accepts it") {
    const std::string csv = (kShared / "data/speed/instance.csv").string() + ":concept";
    Run r = expect_refused(cat(base, {"--concept", "Pikachu", "--retain", csv, "--threshold", "1e-30"}),
                           {1, "has no eigenvalue below the threshold 1e-30 (smallest "}, output, watched, tmp.io());
    CHECK_THAT(r.err, Catch::Contains("attn2.to_v.weight"));
    CHECK_THAT(r.err, Catch::Contains("hint: ") && Catch::Contains("--allow-empty-null-space"));
    r = run(cat(base, {"--concept", "Pikachu", "--retain", csv, "--threshold", "1e-30", "--allow-empty-null-space"}),
            tmp.io());
    INFO("stderr:\n" << r.err);
    CHECK(r.rc == 0);
    CHECK(fs::exists(output));
  }
  SECTION("a preset with an unknown key") {
    std::string f = file("typo.json", "{\"thresold\": 0.2}");
    Run r = expect_refused(cat(base, {"--concept", "Pikachu", "--preset", f}), {2, "has an unknown key 'thresold'"}, output,
                           watched, tmp.io());
    CHECK_THAT(r.err, Catch::Contains("hint: keys are the long option names"));
  }
  SECTION("a preset that is not valid JSON") {
    std::string f = file("broken.json", "{\"threshold\": 0.2,");
    expect_refused(cat(base, {"--concept", "Pikachu", "--preset", f}), {2, "is not valid JSON"}, output, watched, tmp.io());
  }
  SECTION("a preset key of the wrong type") {
    std::string f = file("type.json", "{\"augment\": \"ten\"}");
    expect_refused(cat(base, {"--concept", "Pikachu", "--preset", f}), {2, "key 'augment' is"}, output, watched, tmp.io());
  }
  SECTION("a preset value out of range") {
    std::string f = file("range.json", "{\"augment\": 1e300}");
    Run r = run(cat(base, {"--concept", "Pikachu", "--preset", f}), tmp.io());
    CHECK(r.rc == 2);
    check_error_lines(r.err, "augment");
    CHECK_FALSE(fs::exists(output));
  }
  SECTION("an unknown built-in preset") {
    expect_refused(cat(base, {"--concept", "Pikachu", "--preset", "celebrities"}), {2, "unknown preset 'celebrities'"},
                   output, watched, tmp.io());
  }
  SECTION("a threshold that is not a positive number") {
    expect_refused(cat(base, {"--concept", "Pikachu", "--threshold", "-1"}), {2, "threshold"}, output, watched, tmp.io());
    expect_refused(cat(base, {"--concept", "Pikachu", "--threshold", "nan"}), {2, "threshold"}, output, watched, tmp.io());
  }
}
