// Helpers of the bad-input e2e tests (test_app_badinput*.cpp): running the real binary, crafting
// damaged safetensors files from the tiny fixture, and the "refused cleanly" assertion
// (exit status, one `error:` line, no output, nothing left behind, input untouched).
#pragma once

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "speed/tensor.h"

extern char** environ;

namespace badinput {

namespace fs = std::filesystem;
using OJson = nlohmann::ordered_json;

inline const fs::path kShared = SPEED_SHARED_DIR;
inline const fs::path kFixture = kShared / "golden" / "fixture_tiny_f32.safetensors";
inline const std::string kMerges = (kShared / "data/clip/bpe_simple_vocab_16e6.txt.gz").string();

struct TempDir {
  fs::path path;
  TempDir() {
    std::string t = (fs::temp_directory_path() / "speed-bad-XXXXXX").string();
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
    fs::create_directories(path / "in");
    fs::create_directories(path / "out");
    fs::create_directories(path / "io");
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path in() const { return path / "in"; }
  fs::path out() const { return path / "out"; }
  fs::path io() const { return path / "io"; }
};

inline std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

inline void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

// Chunked, so that multi-GB inputs are hashed without holding them in memory.
inline std::uint64_t file_hash(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> buf(std::size_t{8} << 20);
  std::uint64_t h = 0;
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto got = static_cast<std::size_t>(f.gcount());
    if (got == 0) break;
    h = speed::hash_combine(h, speed::hash64(buf.data(), got));
  }
  return h;
}

// Every entry below `dir` (relative path -> size, -1 for folders): two equal snapshots mean a
// run created, removed and resized nothing there (temp files, sidecars, partial outputs).
inline std::map<std::string, std::int64_t> snapshot(const fs::path& dir) {
  std::map<std::string, std::int64_t> s;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); it != fs::recursive_directory_iterator(); ++it) {
    const auto& e = *it;
    std::int64_t size = e.is_regular_file(ec) ? static_cast<std::int64_t>(e.file_size(ec)) : -1;
    s[fs::relative(e.path(), dir).string()] = size;
  }
  return s;
}

inline std::string show(const std::map<std::string, std::int64_t>& s) {
  std::string out;
  for (const auto& [k, v] : s) out += "  " + k + " (" + std::to_string(v) + ")\n";
  return out.empty() ? "  (empty)\n" : out;
}

struct Run {
  int rc = -1;      // exit status, or 128 + signal
  int signal = 0;   // the signal that ended it, 0 if it exited
  std::string out, err;
};

// Starts the binary with `args` (no shell), stdout/stderr into files under `io`.
inline pid_t spawn(const std::vector<std::string>& args, const fs::path& io) {
  std::vector<std::string> full = {SPEED_ERASE_BIN};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : full) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  const std::string o = (io / "stdout.txt").string(), e = (io / "stderr.txt").string();
  posix_spawn_file_actions_addopen(&fa, 1, o.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, e.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  REQUIRE(rc == 0);
  return pid;
}

inline Run wait_run(pid_t pid, const fs::path& io) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  Run r;
  if (WIFEXITED(status)) {
    r.rc = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.signal = WTERMSIG(status);
    r.rc = 128 + r.signal;
  }
  r.out = slurp(io / "stdout.txt");
  r.err = slurp(io / "stderr.txt");
  return r;
}

// Polls `ready` every 2 ms while the spawned run is still going (at most 5 minutes); fails the
// test if the run ends first. For signalling a run in the middle of its output.
template <typename Ready>
bool wait_while_running(pid_t pid, const fs::path& io, Ready ready) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      FAIL("the run ended before its output was being written: " << slurp(io / "stderr.txt"));
    }
    if (ready()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

inline Run run(const std::vector<std::string>& args, const fs::path& io) { return wait_run(spawn(args, io), io); }

inline std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) v.push_back(l);
  return v;
}

inline std::vector<std::string> cat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// SPEC §3: exactly one `error: ...` line, last on stderr or followed only by its `hint: ...`.
inline void check_error_lines(const std::string& err, const std::string& substring) {
  INFO("stderr:\n" << err);
  auto lines = lines_of(err);
  int errors = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].rfind("error: ", 0) == 0) {
      ++errors;
      at = i;
    }
  }
  REQUIRE(errors == 1);
  CHECK_THAT(lines[at], Catch::Contains(substring));
  const std::size_t after = lines.size() - at - 1;
  CHECK(after <= 1);
  if (after == 1) CHECK_THAT(lines.back(), Catch::StartsWith("hint: "));
}

// Runs `args` and asserts a clean refusal: exit status `rc`, an `error:` line containing
// `substring`, nothing on stdout, `output` not created, no file created/changed/removed in the
// watched folders (temp files, sidecars), and every input byte-identical.
struct Refusal {
  int rc = 1;
  std::string substring;
};

inline Run expect_refused(const std::vector<std::string>& args, const Refusal& want, const fs::path& output,
                          const std::vector<fs::path>& watched, const fs::path& io) {
  std::vector<std::map<std::string, std::int64_t>> before;
  for (const auto& w : watched) before.push_back(snapshot(w));
  std::map<std::string, std::uint64_t> input_hashes;
  for (const auto& w : watched) {
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(w, ec); it != fs::recursive_directory_iterator(); ++it) {
      if (it->is_regular_file()) input_hashes[it->path().string()] = file_hash(it->path());
    }
  }
  Run r = run(args, io);
  INFO("stderr:\n" << r.err);
  CHECK(r.rc == want.rc);
  check_error_lines(r.err, want.substring);
  CHECK(r.out.empty());
  CHECK_FALSE(fs::exists(fs::symlink_status(output)));
  for (std::size_t i = 0; i < watched.size(); ++i) {
    auto after = snapshot(watched[i]);
    INFO("folder '" << watched[i].string() << "' before:\n" << show(before[i]) << "after:\n" << show(after));
    CHECK(after == before[i]);
  }
  for (const auto& [path, h] : input_hashes) {
    INFO("input '" << path << "'");
    CHECK(file_hash(path) == h);
  }
  return r;
}

// `erase` on `model` with the fixture's merges, no cache, quiet, writing `output`.
inline std::vector<std::string> erase_args(const fs::path& model, const fs::path& output) {
  return {"--model", model.string(), "--tokenizer", kMerges, "--no-cache", "-q",
          "--output", output.string()};
}

// ---- crafted safetensors ----

inline std::uint64_t le64(const std::string& b, std::size_t at = 0) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + static_cast<std::size_t>(i)]);
  return v;
}

inline std::string le64_bytes(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// The fixture split into its header (as ordered JSON: entries stay in file order) and data.
struct Parts {
  std::string bytes;   // the whole file
  std::string header;  // the N header bytes (padding included)
  std::string data;    // the data buffer
  OJson json;
};

inline const Parts& fixture() {
  static const Parts p = [] {
    Parts q;
    q.bytes = slurp(kFixture);
    REQUIRE(q.bytes.size() > 8);
    const std::uint64_t n = le64(q.bytes);
    q.header = q.bytes.substr(8, n);
    q.data = q.bytes.substr(8 + n);
    q.json = OJson::parse(q.header);
    return q;
  }();
  return p;
}

// 8-byte length + header text padded with spaces to a multiple of 8 + data.
inline std::string assemble(std::string header, const std::string& data) {
  header.append((8 - header.size() % 8) % 8, ' ');
  return le64_bytes(header.size()) + header + data;
}

// Header text from (name, entry-JSON) pairs, so that names may repeat.
inline std::string header_text(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string h = "{";
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (i) h += ",";
    h += OJson(entries[i].first).dump() + ":" + entries[i].second;
  }
  return h + "}";
}

// Name of the first tensor (in file order) whose name contains `part`.
inline std::string tensor_named(const std::string& part) {
  for (const auto& [k, v] : fixture().json.items()) {
    if (k != "__metadata__" && k.find(part) != std::string::npos) return k;
  }
  FAIL("the fixture has no tensor containing '" << part << "'");
  return {};
}

}  // namespace badinput
