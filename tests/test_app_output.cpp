// The output is committed last: a run that fails after its export (the report cannot be written)
// or is killed while it writes leaves an existing output (--force) byte-identical and no temp file
// or hidden temp folder behind. e2e tests of the real binary.
#include <ATen/ATen.h>

#include "test_app_badinput_util.h"

#include <sys/mount.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "speed/synth.h"

using namespace badinput;

namespace {

std::vector<std::string> forced_pikachu_args(const fs::path& model, const fs::path& output) {
  return cat(erase_args(model, output), {"--concept", "Pikachu", "--force"});
}

// A 64 KiB tmpfs (root with CAP_SYS_ADMIN), nearly filled so that a temp file can be created but
// a report of a few KiB cannot be written: the one way to make the report fail *after* the
// export that works as root (chmod does not stop root). Unmounted on destruction.
struct FullDisk {
  fs::path dir;
  bool mounted = false;
  explicit FullDisk(const fs::path& d) : dir(d) {
    fs::create_directories(dir);
    mounted = ::mount("tmpfs", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755") == 0;
    if (!mounted) {
      WARN("cannot mount a tmpfs (" << std::strerror(errno) << "): the report-failure case is skipped");
      return;
    }
    spit(dir / "filler", std::string(60 * 1024, 'x'));
  }
  ~FullDisk() {
    if (mounted) ::umount2(dir.c_str(), MNT_DETACH);
  }
};

// Every regular file below `dir` (relative path -> hash).
std::map<std::string, std::uint64_t> hashes(const fs::path& dir) {
  std::map<std::string, std::uint64_t> h;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) h[fs::relative(e.path(), dir).string()] = file_hash(e.path());
  }
  return h;
}

}  // namespace

TEST_CASE("output: a report that cannot be written leaves the previous output as it was", "[e2e]") {
  TempDir tmp;
  FullDisk disk(tmp.path / "full");
  if (!disk.mounted) return;
  const fs::path report = disk.dir / "r.json";

  SECTION("single file, every format") {
    const fs::path model = tmp.in() / "model.safetensors";
    fs::copy_file(kFixture, model);
    for (const char* format : {"full", "edited", "pt", "lora"}) {
      INFO("--format " << format);
      const fs::path out = tmp.out() / (std::string("old.") + format);
      spit(out, std::string("the previous output of format ") + format);
      if (std::string(format) == "pt") spit(out.string() + ".report.json", "the previous sidecar");
      const auto before = snapshot(tmp.out());
      const auto hashes_before = hashes(tmp.out());
      Run r = run(cat(forced_pikachu_args(model, out), {"--format", format, "--report", report.string()}), tmp.io());
      CHECK(r.rc == 1);
      check_error_lines(r.err, "No space left on device");
      CHECK(slurp(out) == std::string("the previous output of format ") + format);
      INFO("output folder before:\n" << show(before) << "after:\n" << show(snapshot(tmp.out())));
      CHECK(snapshot(tmp.out()) == before);  // no temp file, no sidecar, nothing resized
      CHECK(hashes(tmp.out()) == hashes_before);
      CHECK_FALSE(fs::exists(report));
    }
  }
  SECTION("diffusers folder, full") {
    const fs::path model = tmp.in() / "fixture_tiny_diffusers";
    fs::copy(kShared / "golden" / "fixture_tiny_diffusers", model, fs::copy_options::recursive);
    const fs::path out = tmp.out() / "old-folder";
    fs::create_directories(out / "unet");
    spit(out / "unet" / "diffusion_pytorch_model.safetensors", "the previous UNet");
    spit(out / "model_index.json", "{}");
    const auto before = snapshot(tmp.out());
    const auto hashes_before = hashes(tmp.out());
    Run r = run(cat(forced_pikachu_args(model, out), {"--report", report.string()}), tmp.io());
    CHECK(r.rc == 1);
    check_error_lines(r.err, "No space left on device");
    INFO("output folder before:\n" << show(before) << "after:\n" << show(snapshot(tmp.out())));
    CHECK(snapshot(tmp.out()) == before);  // no hidden temp folder, the old folder whole
    CHECK(hashes(tmp.out()) == hashes_before);
  }
  // The same run with a writable report replaces the output: the failure above was the report.
  SECTION("control: the report can be written") {
    const fs::path model = tmp.in() / "model.safetensors";
    fs::copy_file(kFixture, model);
    const fs::path out = tmp.out() / "old.full";
    spit(out, "the previous output");
    Run r = run(cat(forced_pikachu_args(model, out), {"--report", (tmp.out() / "r.json").string()}), tmp.io());
    INFO("stderr:\n" << r.err);
    CHECK(r.rc == 0);
    CHECK(fs::file_size(out) > fs::file_size(kFixture) / 2);
    CHECK(fs::exists(tmp.out() / "r.json"));
  }
}

TEST_CASE("output: SIGTERM while a diffusers folder is written leaves no temp folder", "[e2e]") {
  TempDir tmp;
  // A full-size SD 1.x diffusers folder (fp16, ~2 GB) so that the write lasts long enough.
  const fs::path model = tmp.in() / "sd1-diffusers";
  speed::SynthOptions so;
  so.full_size = true;
  so.dtype = speed::Dtype::F16;
  so.layout = speed::SynthLayout::Diffusers;
  speed::write_synth_checkpoint(model.string(), so);
  const auto model_hashes = hashes(model);

  for (bool existing : {false, true}) {
    INFO((existing ? "over an existing output folder (--force)" : "no output folder yet"));
    const fs::path out = tmp.out() / "erased";
    if (existing) {
      fs::create_directories(out / "unet");
      spit(out / "unet" / "diffusion_pytorch_model.safetensors", "the previous UNet");
    }
    const auto before = snapshot(tmp.out());
    pid_t pid = spawn(forced_pikachu_args(model, out), tmp.io());
    // Wait for the hidden temp folder to hold more than 1 MiB, then signal once.
    const bool seen = wait_while_running(pid, tmp.io(), [&] {
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(tmp.out(), ec)) {
        const std::string name = e.path().filename().string();
        if (name.rfind(".erased.tmp-", 0) != 0 || !e.is_directory(ec)) continue;
        std::uint64_t bytes = 0;
        for (const auto& f : fs::recursive_directory_iterator(e.path(), ec)) {
          if (f.is_regular_file(ec)) bytes += f.file_size(ec);
        }
        if (bytes > (1u << 20)) return true;
      }
      return false;
    });
    REQUIRE(seen);
    REQUIRE(::kill(pid, SIGTERM) == 0);
    Run r = wait_run(pid, tmp.io());
    INFO("stderr:\n" << r.err);
    CHECK(r.signal == SIGTERM);  // dies with the signal's default action after cleaning up
    INFO("output folder before:\n" << show(before) << "after:\n" << show(snapshot(tmp.out())));
    CHECK(snapshot(tmp.out()) == before);
    if (existing) CHECK(slurp(out / "unet" / "diffusion_pytorch_model.safetensors") == "the previous UNet");
    fs::remove_all(out);
  }
  CHECK(hashes(model) == model_hashes);
}
