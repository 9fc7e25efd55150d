// Bad input found by a red-team pass over the real binary (each case crashed, hung, wrote Inf,
// overwrote or deleted an input, or printed two `error:` lines before its fix): zero-size K/V
// tensors, control characters in tensor names, weights whose edit overflows their dtype, outputs
// and reports naming inputs other than the model, an output folder holding the input, link loops
// in a diffusers folder, out-of-range seeds, targets with no tokens, pipes nobody writes to,
// invalid UTF-8 prompts, NaN edits in eval, a closed stderr pipe and a file-size limit.
#include <sys/resource.h>
#include <sys/stat.h>

#include <cstring>
#include <limits>

#include "test_app_badinput_util.h"

using namespace badinput;

namespace {

struct Tensor {
  std::string name, dtype;
  std::vector<std::int64_t> shape;
  std::string bytes;
};

// The fixture's tensors in file order (metadata kept), for editing and re-assembling.
std::vector<Tensor> fixture_tensors() {
  const Parts& fx = fixture();
  std::vector<Tensor> out;
  for (const auto& [k, v] : fx.json.items()) {
    if (k == "__metadata__") continue;
    const auto b = v["data_offsets"][0].get<std::size_t>(), e = v["data_offsets"][1].get<std::size_t>();
    out.push_back({k, v["dtype"].get<std::string>(), v["shape"].get<std::vector<std::int64_t>>(),
                   fx.data.substr(b, e - b)});
  }
  return out;
}

std::string rebuild(const std::vector<Tensor>& ts) {
  OJson h;
  if (fixture().json.contains("__metadata__")) h["__metadata__"] = fixture().json["__metadata__"];
  std::string data;
  for (const Tensor& t : ts) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  return assemble(h.dump(), data);
}

bool is_kv(const std::string& name) {
  return name.find("attn2.to_k") != std::string::npos || name.find("attn2.to_v") != std::string::npos ||
         name.find("attn2to_k") != std::string::npos || name.find("attn2to_v") != std::string::npos;
}

// IEEE half of a float in the normal range (enough for values near ±65504).
std::uint16_t to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u, exp = ((x >> 23) & 0xffu) - 127 + 15, man = (x >> 13) & 0x3ffu;
  return static_cast<std::uint16_t>(sign | (exp << 10) | man);
}

}  // namespace

TEST_CASE("bad input (edge): checkpoints whose headers parse", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  const fs::path output = tmp.out() / "edited.safetensors";
  const std::vector<fs::path> watched = {tmp.in(), tmp.out()};

  SECTION("a K/V pair with zero rows (was a segfault in the DPA step)") {
    auto ts = fixture_tensors();
    int changed = 0;
    for (Tensor& t : ts) {
      if (is_kv(t.name) && (t.name.find("middle_block.1.") != std::string::npos ||
                            t.name.find("middle_block1") != std::string::npos)) {
        t.shape = {0, t.shape[1]};
        t.bytes.clear();
        ++changed;
      }
    }
    REQUIRE(changed >= 2);
    spit(model, rebuild(ts));
    expect_refused(cat(erase_args(model, output), {"--concept", "Pikachu"}),
                   {1, "expected [out, in] with out, in >= 1"}, output, watched, tmp.io());
  }
  SECTION("a newline in a tensor name stays inside one error line") {
    auto ts = fixture_tensors();
    ts.push_back({"cond_stage_model.transformer.text_model.junk\nerror: injected line", "F32", {1}, std::string(4, '\0')});
    spit(model, rebuild(ts));
    expect_refused(cat(erase_args(model, output), {"--concept", "Pikachu"}),
                   {1, "junk\\nerror: injected line"}, output, watched, tmp.io());
  }
  SECTION("K/V copies under a second layout's names: edited under one, a warning for the other") {
    auto ts = fixture_tensors();
    const std::string ldm = "model.diffusion_model.";
    std::size_t copies = 0;
    for (std::size_t i = 0, n = ts.size(); i < n; ++i) {
      if (is_kv(ts[i].name) && ts[i].name.rfind(ldm, 0) == 0) {
        Tensor t = ts[i];
        t.name = t.name.substr(std::string("model.").size());  // ComfyUI's "diffusion_model."
        ts.push_back(t);
        ++copies;
      }
    }
    REQUIRE(copies == 32);
    spit(model, rebuild(ts));
    Run r = run(cat(erase_args(model, output), {"--concept", "Pikachu"}), tmp.io());
    INFO("stderr:\n" << r.err);
    CHECK(r.rc == 0);
    CHECK_THAT(r.err, Catch::Contains("also holds 32 cross-attention K/V tensor(s) named for another UNet layout"));
  }
  SECTION("finite fp16 weights near 65504 whose edit overflows fp16 (was written as Inf)") {
    auto ts = fixture_tensors();
    std::uint32_t state = 12345;
    for (Tensor& t : ts) {
      if (!is_kv(t.name)) continue;
      const std::int64_t n = t.shape[0] * t.shape[1];
      t.dtype = "F16";
      t.bytes.assign(static_cast<std::size_t>(2 * n), '\0');
      for (std::int64_t i = 0; i < n; ++i) {
        state = state * 1664525u + 1013904223u;
        const float v = (state & 1 ? 1.0f : -1.0f) * 65504.0f * (0.9f + 0.1f * static_cast<float>(state >> 8) / 16777216.0f);
        const std::uint16_t h = to_half(v);
        std::memcpy(&t.bytes[static_cast<std::size_t>(2 * i)], &h, 2);
      }
    }
    spit(model, rebuild(ts));
    for (const char* format : {"edited", "full"}) {
      INFO("--format " << format);
      expect_refused(cat(erase_args(model, output), {"--concept", "Pikachu", "--format", format}),
                     {1, "does not fit its dtype"}, output, watched, tmp.io());
    }
  }
}

TEST_CASE("bad input (edge): outputs and reports never replace or hold an input", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  const std::vector<fs::path> watched = {tmp.in(), tmp.out()};
  const fs::path list = tmp.in() / "list.txt", csv = tmp.in() / "retain.csv", preset = tmp.in() / "p.json";
  spit(list, "Pikachu\n");
  spit(csv, "concept\ncat\ndog\n");
  spit(preset, R"({"anchor": "person"})");
  const fs::path out = tmp.out() / "x.safetensors";
  const auto base = cat(erase_args(model, out), {"--format", "edited"});

  SECTION("--report names the concept list, the retain CSV, the tokenizer") {
    for (const fs::path& f : {list, csv}) {
      INFO("--report " << f.string());
      expect_refused(cat(base, {"--concepts", list.string(), "--retain", csv.string() + ":concept", "--report", f.string()}),
                     {2, "names an input or the output"}, out, watched, tmp.io());
    }
    const fs::path merges = tmp.in() / "merges.txt.gz";
    fs::copy_file(kMerges, merges);
    expect_refused({"--model", model.string(), "--tokenizer", merges.string(), "--no-cache", "-q", "--output",
                    out.string(), "--concept", "Pikachu", "--report", merges.string()},
                   {2, "names an input or the output"}, out, watched, tmp.io());
  }
  SECTION("--output --force names the concept list or the preset file") {
    Run r = run(cat(erase_args(model, list), {"--concepts", list.string(), "--force"}), tmp.io());
    CHECK(r.rc == 2);
    check_error_lines(r.err, "is the input file");
    CHECK(slurp(list) == "Pikachu\n");
    r = run(cat(erase_args(model, preset), {"--preset", preset.string(), "--concept", "Pikachu", "--force"}),
            tmp.io());
    CHECK(r.rc == 2);
    check_error_lines(r.err, "is the input file");
    CHECK(slurp(preset) == R"({"anchor": "person"})");
  }
  SECTION("--output --force names a folder that holds the model (was deleted with it)") {
    const fs::path parent = tmp.out() / "p";
    fs::create_directories(parent);
    fs::copy(kShared / "golden" / "fixture_tiny_diffusers", parent / "model", fs::copy_options::recursive);
    spit(parent / "notes.txt", "precious");
    Run r = run({"--model", (parent / "model").string(), "--tokenizer", kMerges, "--no-cache", "-q",
                 "--concept", "Pikachu", "--output", parent.string(), "--force"},
                tmp.io());
    CHECK(r.rc == 2);
    check_error_lines(r.err, "contains the input");
    CHECK(slurp(parent / "notes.txt") == "precious");
    CHECK(fs::exists(parent / "model" / "model_index.json"));
    // A single-file model's folder as the output, likewise.
    expect_refused(cat(erase_args(model, tmp.in()), {"--concept", "Pikachu", "--force"}),
                   {2, "contains the input"}, tmp.in() / "no-such-output", watched, tmp.io());
  }
  SECTION("eval --report names the prompts file") {
    const fs::path edited = tmp.out() / "e.safetensors";
    Run made = run(cat(erase_args(model, edited), {"--concept", "Pikachu", "--format", "edited"}), tmp.io());
    REQUIRE(made.rc == 0);
    const fs::path prompts = tmp.in() / "prompts.txt";
    spit(prompts, "a photo of a cat\n");
    expect_refused({"eval", "--model", model.string(), "--edited", edited.string(), "--tokenizer", kMerges,
                    "--no-cache", "-q", "--concept", "Pikachu", "--prompts", prompts.string(), "--report",
                    prompts.string()},
                   {2, "names an input or the output"}, tmp.out() / "no-such-output", watched, tmp.io());
  }
}

TEST_CASE("bad input (edge): odd inputs that used to hang or pass silently", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  const std::vector<fs::path> watched = {tmp.in(), tmp.out()};
  const fs::path out = tmp.out() / "x.safetensors";

  SECTION("a diffusers folder with a link to itself (was an endless copy, then a busy loop)") {
    const fs::path m = tmp.in() / "m";
    fs::copy(kShared / "golden" / "fixture_tiny_diffusers", m, fs::copy_options::recursive);
    fs::create_directory_symlink(".", m / "self");
    const fs::path o = tmp.out() / "m.speed-erase";
    expect_refused({"--model", m.string(), "--tokenizer", kMerges, "--no-cache", "-q", "--concept", "Pikachu",
                    "--output", o.string()},
                   {1, "a link loop"}, o, watched, tmp.io());
  }
  SECTION("--seed out of the unsigned 64-bit range (was wrapped or saturated)") {
    for (const char* seed : {"-1", "18446744073709551616", "1e3", ""}) {
      INFO("--seed '" << seed << "'");
      expect_refused(cat(erase_args(model, out), {"--concept", "Pikachu", "--seed", seed}), {2, "--seed"}, out,
                     watched, tmp.io());
    }
  }
  SECTION("targets that tokenize to nothing (was an edit of zero)") {
    for (const char* target : {"\xC2\xA0", "\xE3\x80\x80", "\x01\x02\x03"}) {
      expect_refused(cat(erase_args(model, out), {"--concept", target}), {2, "has no tokens"}, out, watched,
                     tmp.io());
    }
  }
  SECTION("a concept file holding NUL bytes (UTF-16, binary; was a target of NULs)") {
    const fs::path f = tmp.in() / "nul.txt";
    spit(f, std::string("P\0i\0k\0a\0\n\0", 10));
    expect_refused(cat(erase_args(model, out), {"--concepts", f.string()}), {1, "line 1 holds a NUL byte"}, out,
                   watched, tmp.io());
  }
  SECTION("a named pipe nobody writes to as --concepts or --retain (was a hang)") {
    const fs::path fifo = tmp.in() / "fifo";
    REQUIRE(::mkfifo(fifo.c_str(), 0644) == 0);
    expect_refused(cat(erase_args(model, out), {"--concepts", fifo.string()}), {1, "is a pipe and gave no data"},
                   out, watched, tmp.io());
    expect_refused(cat(erase_args(model, out), {"--concept", "Pikachu", "--retain", fifo.string()}),
                   {1, "is a pipe and gave no data"}, out, watched, tmp.io());
  }
  SECTION("encode: invalid UTF-8 prompts (erase already refused them)") {
    const fs::path prompts = tmp.in() / "bad.txt";
    spit(prompts, "ok\n\xED\xA0\x80" "abc\n");
    expect_refused({"encode", "--model", model.string(), "--tokenizer", kMerges, "--no-cache", "--prompts",
                    prompts.string(), "--output", out.string()},
                   {1, "line 2 is not valid UTF-8"}, out, watched, tmp.io());
  }
  SECTION("eval: a NaN in the edited weight (the layer was dropped silently)") {
    const fs::path edited = tmp.io() / "e.safetensors";
    Run made = run(cat(erase_args(model, edited), {"--concept", "Pikachu", "--format", "edited"}), tmp.io());
    REQUIRE(made.rc == 0);
    std::string bytes = slurp(edited);
    const std::uint64_t n = le64(bytes);
    const OJson h = OJson::parse(bytes.substr(8, n));
    std::string first;
    for (const auto& [k, v] : h.items())
      if (k != "__metadata__" && v["dtype"] == "F32") first = k;
    REQUIRE(!first.empty());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(&bytes[8 + n + h[first]["data_offsets"][0].get<std::size_t>()], &nan, 4);
    spit(tmp.in() / "e_nan.safetensors", bytes);
    expect_refused({"eval", "--model", model.string(), "--edited", (tmp.in() / "e_nan.safetensors").string(),
                    "--tokenizer", kMerges, "--no-cache", "-q", "--concept", "Pikachu"},
                   {1, "is not finite"}, tmp.out() / "no-such-output", watched, tmp.io());
  }
}

TEST_CASE("bad input (edge): a closed stderr pipe and a file-size limit", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  const fs::path out = tmp.out() / "x.safetensors";
  const std::vector<std::string> args = {SPEED_ERASE_BIN, "--model", model.string(), "--tokenizer", kMerges,
                                         "--no-cache", "--concept", "Pikachu", "--output", out.string()};
  std::vector<char*> argv;
  std::vector<std::string> copy = args;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);

  SECTION("stderr is a pipe whose reader is gone (`2>&1 | head`): the run completes") {
    int p[2];
    REQUIRE(::pipe(p) == 0);
    ::close(p[0]);  // no reader: every write to stderr fails with EPIPE (or raises SIGPIPE)
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::dup2(p[1], 2);
      ::signal(SIGPIPE, SIG_DFL);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(p[1]);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    INFO("status " << status);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK(fs::exists(out));
    CHECK(snapshot(tmp.out()).size() == 1);  // the output, no temp beside it
  }
  SECTION("a file-size limit below the output's size: an error line, no temp (was SIGXFSZ)") {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      const int err = ::open((tmp.io() / "stderr.txt").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(err, 2);
      const struct rlimit lim = {1 << 20, 1 << 20};  // 1 MiB; the output is ~18 MB
      ::setrlimit(RLIMIT_FSIZE, &lim);
      ::signal(SIGXFSZ, SIG_DFL);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    const std::string err = slurp(tmp.io() / "stderr.txt");
    INFO("status " << status << ", stderr:\n" << err);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 1);
    check_error_lines(err, "File too large");
    CHECK(fs::is_empty(tmp.out()));
  }
}
