// Output-side failures as e2e tests of the real binary: missing or unusable output folders, the
// output naming the input, a full disk (a 64 KiB tmpfs), and SIGINT/SIGTERM while the output is
// being written. Each must exit non-zero with no output, no temp file and the input unchanged.
#include <ATen/ATen.h>

#include "test_app_badinput_util.h"

#include <sys/mount.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "speed/synth.h"

using namespace badinput;

namespace {

std::vector<std::string> pikachu_args(const fs::path& model, const fs::path& output) {
  return cat(erase_args(model, output), {"--concept", "Pikachu"});
}

// A 64 KiB tmpfs (needs root and CAP_SYS_ADMIN); unmounted on destruction.
struct TinyFs {
  fs::path dir;
  bool mounted = false;
  explicit TinyFs(const fs::path& d) : dir(d) {
    fs::create_directories(dir);
    mounted = ::mount("tmpfs", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755") == 0;
    if (!mounted) WARN("cannot mount a tmpfs (" << std::strerror(errno) << "): the disk-full case is skipped");
  }
  ~TinyFs() {
    if (mounted) ::umount2(dir.c_str(), MNT_DETACH);
  }
};

}  // namespace

TEST_CASE("bad output: folders, the input itself, existing files", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  const std::vector<fs::path> watched = {tmp.in(), tmp.out()};

  SECTION("output folder missing") {
    fs::path out = tmp.out() / "no" / "such" / "dir" / "x.safetensors";
    expect_refused(pikachu_args(model, out), {1, "output folder '" + out.parent_path().string() + "' does not exist"},
                   out, watched, tmp.io());
  }
  SECTION("output folder is a regular file (robust 'unwritable' even as root)") {
    spit(tmp.out() / "plain", "not a folder");
    fs::path out = tmp.out() / "plain" / "x.safetensors";
    expect_refused(pikachu_args(model, out), {1, "output folder '" + out.parent_path().string() + "'"}, out, watched,
                   tmp.io());
    out = tmp.out() / "plain" / "sub" / "x.safetensors";
    expect_refused(pikachu_args(model, out), {1, "does not exist"}, out, watched, tmp.io());
  }
  SECTION("output is the input, however spelled") {
    fs::create_symlink(model, tmp.out() / "link.safetensors");
    fs::create_hard_link(model, tmp.out() / "hard.safetensors");
    for (const fs::path& p : {model, tmp.in() / "." / "model.safetensors", tmp.out() / ".." / "in" / "model.safetensors",
                              tmp.out() / "link.safetensors", tmp.out() / "hard.safetensors"}) {
      INFO("--output " << p.string());
      Run r = run(cat(pikachu_args(model, p), {"--force"}), tmp.io());
      CHECK(r.rc == 2);
      check_error_lines(r.err, "is the input model");
    }
    CHECK(file_hash(model) == file_hash(kFixture));
  }
  SECTION("output is a folder") {
    fs::create_directories(tmp.out() / "folder.safetensors");
    fs::path out = tmp.out() / "folder.safetensors";
    Run r = run(cat(pikachu_args(model, out), {"--force"}), tmp.io());
    CHECK(r.rc == 1);
    check_error_lines(r.err, "is a folder, expected a file for --format full");
    CHECK(fs::is_empty(out));
  }
  SECTION("output exists: refused without --force, untouched") {
    fs::path out = tmp.out() / "exists.safetensors";
    spit(out, "precious");
    Run r = run(pikachu_args(model, out), tmp.io());
    CHECK(r.rc == 1);
    check_error_lines(r.err, "output '" + out.string() + "' already exists");
    CHECK(slurp(out) == "precious");
  }
  SECTION("output is a character device (/dev/full)") {
    Run r = run(cat(pikachu_args(model, "/dev/full"), {"--force"}), tmp.io());
    CHECK(r.rc == 1);
    check_error_lines(r.err, "output '/dev/full' exists and is not a regular file");
  }
  SECTION("report folder missing") {
    fs::path out = tmp.out() / "x.safetensors";
    expect_refused(cat(pikachu_args(model, out), {"--report", (tmp.out() / "nope" / "r.json").string()}),
                   {1, "report folder"}, out, watched, tmp.io());
  }
  SECTION("report path is the input model") {
    fs::path out = tmp.out() / "x.safetensors";
    expect_refused(cat(pikachu_args(model, out), {"--report", model.string()}), {2, "names an input or the output"}, out,
                   watched, tmp.io());
  }
}

TEST_CASE("bad output: a full disk leaves nothing behind, in every format", "[e2e]") {
  TempDir tmp;
  const fs::path model = tmp.in() / "model.safetensors";
  fs::copy_file(kFixture, model);
  TinyFs disk(tmp.path / "tiny");
  if (!disk.mounted) return;
  // 8 KiB stay free: temp files can be created, no output (not even a tiny LoRA) fits.
  spit(disk.dir / "filler", std::string(56 * 1024, 'x'));
  for (const char* format : {"full", "edited", "pt", "lora"}) {
    INFO("--format " << format);
    const fs::path out = disk.dir / (std::string("x.") + format);
    expect_refused(cat(pikachu_args(model, out), {"--format", format}), {1, "No space left on device"}, out,
                   {tmp.in(), disk.dir}, tmp.io());
  }
  // The output fits, the report does not: the run fails and takes its output with it.
  {
    const fs::path out = tmp.out() / "x.safetensors";
    expect_refused(cat(pikachu_args(model, out), {"--format", "edited", "--report", (disk.dir / "r.json").string()}),
                   {1, "No space left on device"}, out, {tmp.in(), tmp.out(), disk.dir}, tmp.io());
  }
}

TEST_CASE("bad output: SIGINT/SIGTERM during the write leave no output and no temp file", "[e2e]") {
  TempDir tmp;
  // A full-size SD 1.x (fp16, ~2 GB) so that the write lasts long enough to be interrupted.
  const fs::path model = tmp.in() / "sd1-full.safetensors";
  speed::SynthOptions so;
  so.full_size = true;
  so.dtype = speed::Dtype::F16;
  speed::write_synth_checkpoint(model.string(), so);
  const std::uint64_t size = fs::file_size(model);
  const std::uint64_t hash = file_hash(model);

  for (int sig : {SIGINT, SIGTERM}) {
    INFO("signal " << ::strsignal(sig));
    const fs::path out = tmp.out() / "edited.safetensors";
    pid_t pid = spawn(pikachu_args(model, out), tmp.io());
    // Wait for the temp file to exist and hold data (its registration for clean-up follows its
    // creation by microseconds), then signal once.
    const bool seen = wait_while_running(pid, tmp.io(), [&] {
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(tmp.out(), ec)) {
        if (e.path().filename().string().find(".tmp-") != std::string::npos && e.file_size(ec) > (1u << 20)) return true;
      }
      return false;
    });
    REQUIRE(seen);
    REQUIRE(::kill(pid, sig) == 0);
    Run r = wait_run(pid, tmp.io());
    INFO("stderr:\n" << r.err);
    CHECK(r.rc != 0);
    CHECK(r.signal == sig);  // dies with the signal's default action after cleaning up
    CHECK_FALSE(fs::exists(out));
    INFO("left in the output folder:\n" << show(snapshot(tmp.out())));
    CHECK(snapshot(tmp.out()).empty());
  }
  CHECK(fs::file_size(model) == size);
  CHECK(file_hash(model) == hash);
}
