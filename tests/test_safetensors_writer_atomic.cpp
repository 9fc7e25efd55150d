// speed/atomic_file.h: copy_from in the kernel and by read + write (same bytes), staged files
// published late, AtomicDir swapping a folder in and cleaning up; rewrite from a from_memory
// source leaves that source intact.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <random>
#include <string>

#include <catch2/catch.hpp>

#include "speed/atomic_file.h"
#include "speed/safetensors.h"
#include "test_support.h"

namespace fs = std::filesystem;
using speed::test::slurp;
using speed::test::TempDir;

namespace {

std::string random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

void spit(const fs::path& p, const std::string& bytes) {
  std::FILE* f = std::fopen(p.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
  std::fclose(f);
}

// "same" or where two byte strings first differ (a failed check prints this, not ~290 MB).
std::string compare_bytes(const std::string& got, const std::string& want) {
  const auto diff = std::mismatch(got.begin(), got.end(), want.begin(), want.end());
  if (diff.first == got.end() && diff.second == want.end()) return "same";
  return "got " + std::to_string(got.size()) + " bytes, expected " + std::to_string(want.size()) +
         "; first difference at byte " + std::to_string(diff.first - got.begin());
}

struct Fd {
  int fd;
  explicit Fd(const fs::path& p) : fd(::open(p.c_str(), O_RDONLY)) { REQUIRE(fd >= 0); }
  ~Fd() { ::close(fd); }
};

// Writes header + src[a, a+n) + middle + src[b, b+m) + tail: unaligned offsets and lengths,
// writes between copies (the buffer must be flushed before each copy), stretches larger than
// the 8 MiB write-out and copy steps and than the 32 MiB the writer keeps in flight; then all of
// src again by copy, by one large write and by copy from byte 1 (~290 MB in all), so that its
// waits and page-cache drops run many times, between and inside writes.
std::string staged_copy(const fs::path& src, const fs::path& out, bool& in_kernel) {
  const std::string bytes = slurp(src);
  speed::AtomicFile f(out.string(), false);
  Fd in(src);
  f.write("head", 4);
  f.copy_from(in.fd, 3, 70'000'001);
  f.write("middle", 6);
  f.copy_from(in.fd, 5'000'000, 123);
  f.write("tail", 4);
  CHECK(f.size() == 4 + 70'000'001 + 6 + 123 + 4);
  f.copy_from(in.fd, 0, bytes.size());
  f.write(bytes.data(), bytes.size());
  f.copy_from(in.fd, 1, bytes.size() - 1);
  CHECK(f.size() == 4 + 70'000'001 + 6 + 123 + 4 + 3 * bytes.size() - 1);
  f.finish();
  CHECK_FALSE(fs::exists(out));  // finished is not published
  CHECK(fs::file_size(f.temp_path()) == f.size());
  in_kernel = f.copied_in_kernel();
  f.publish();
  return "head" + bytes.substr(3, 70'000'001) + "middle" + bytes.substr(5'000'000, 123) + "tail" + bytes +
         bytes + bytes.substr(1);
}

}  // namespace

TEST_CASE("atomic file: copy_from gives the same bytes in the kernel and by read + write", "[unit]") {
  TempDir tmp("speed-atomic");
  const std::string bytes = random_bytes(std::size_t{72} << 20, 7);
  const fs::path src = tmp.path / "src.bin";
  spit(src, bytes);

  bool in_kernel = false;
  const fs::path out = tmp.path / "out.bin";
  const std::string want = staged_copy(src, out, in_kernel);
  CHECK(compare_bytes(slurp(out), want) == "same");
  CHECK(in_kernel);  // same filesystem: copy_file_range

  // From another filesystem (tmpfs) copy_file_range fails with EXDEV: the read + write fallback.
  if (fs::is_directory("/dev/shm")) {
    TempDir shm_dir("speed-atomic-shm");
    const fs::path shm = fs::path("/dev/shm") / fs::path(shm_dir.path).filename().concat(".bin");
    spit(shm, bytes);
    const fs::path out2 = tmp.path / "out2.bin";
    bool in_kernel2 = true;
    struct stat a {}, b {};
    REQUIRE(::stat(shm.c_str(), &a) == 0);
    REQUIRE(::stat(tmp.path.c_str(), &b) == 0);
    const std::string want2 = staged_copy(shm, out2, in_kernel2);
    fs::remove(shm);
    CHECK(compare_bytes(slurp(out2), want2) == "same");
    if (a.st_dev != b.st_dev) CHECK_FALSE(in_kernel2);
  }
  speed::test::require_error(
      [&] {
        speed::AtomicFile f((tmp.path / "short.bin").string(), false);
        Fd in(src);
        f.copy_from(in.fd, bytes.size() - 10, 20);
      },
      "the source ends before byte");
  CHECK_FALSE(fs::exists(tmp.path / "short.bin"));
  CHECK(speed::pending_temp_files() == 0);
}

TEST_CASE("atomic file: an unpublished file leaves the target as it was", "[unit]") {
  TempDir tmp("speed-atomic");
  const fs::path out = tmp.path / "out.bin";
  spit(out, "previous");
  {
    speed::AtomicFile f(out.string(), true);
    f.write("new bytes", 9);
    f.finish();
    CHECK(slurp(out) == "previous");
    CHECK(speed::pending_temp_files() == 1);
  }
  CHECK(slurp(out) == "previous");
  CHECK(speed::pending_temp_files() == 0);
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
}

TEST_CASE("atomic dir: swapped in whole, old folder removed, unpublished removed", "[unit]") {
  TempDir tmp("speed-atomic");
  const fs::path out = tmp.path / "model";
  fs::create_directories(out / "unet");
  spit(out / "unet" / "old.bin", "old");
  spit(out / "only-old.txt", "old");

  speed::test::require_error([&] { speed::AtomicDir d(out.string(), false); }, "already exists");
  {
    speed::AtomicDir d(out.string(), true);
    fs::create_directories(fs::path(d.temp_path()) / "unet" / "deeper");
    spit(fs::path(d.temp_path()) / "unet" / "deeper" / "x.bin", "x");
    CHECK(speed::pending_temp_files() == 1);
  }  // not published: removed, old folder untouched
  CHECK(speed::pending_temp_files() == 0);
  CHECK(slurp(out / "unet" / "old.bin") == "old");
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
  {
    speed::AtomicDir d(out.string(), true);
    fs::create_directories(fs::path(d.temp_path()) / "unet");
    spit(fs::path(d.temp_path()) / "unet" / "new.bin", "new");
    d.publish();
  }
  CHECK(slurp(out / "unet" / "new.bin") == "new");
  CHECK_FALSE(fs::exists(out / "unet" / "old.bin"));
  CHECK_FALSE(fs::exists(out / "only-old.txt"));
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);  // old one gone
  CHECK(speed::pending_temp_files() == 0);
  spit(tmp.path / "plain", "a file");
  speed::test::require_error([&] { speed::AtomicDir d((tmp.path / "plain").string(), true); },
                             "exists and is not a folder");
}

TEST_CASE("atomic dir: SIGTERM removes the temp folder with everything in it", "[unit]") {
  TempDir tmp("speed-atomic");
  const fs::path out = tmp.path / "model";
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    speed::install_cleanup_signal_handlers();
    speed::AtomicDir d(out.string(), false);
    fs::create_directories(fs::path(d.temp_path()) / "a" / "b");
    spit(fs::path(d.temp_path()) / "a" / "b" / "x.bin", "x");
    spit(fs::path(d.temp_path()) / "top.bin", "y");
    fs::create_symlink("/", fs::path(d.temp_path()) / "link-to-root");  // removed, never followed
    speed::AtomicFile f((fs::path(d.temp_path()) / "a" / "open.bin").string(), false);
    f.write("z", 1);
    char c = 1;
    (void)!::write(ready[1], &c, 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char c = 0;
  REQUIRE(::read(ready[0], &c, 1) == 1);
  ::close(ready[0]);
  REQUIRE(::kill(pid, SIGTERM) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
  CHECK(fs::is_empty(tmp.path));
  CHECK(fs::exists("/etc"));
}

TEST_CASE("rewrite: a from_memory source is still intact after the rewrite", "[unit]") {
  TempDir tmp("speed-atomic");
  const std::string fixture = slurp(fs::path(SPEED_SHARED_DIR) / "golden" / "fixture_tiny_f32.safetensors");
  speed::SafeTensors st = speed::SafeTensors::from_memory(fixture, "fixture");
  speed::RewriteOptions o;
  o.set_metadata = {{"k", "v"}};
  speed::rewrite_safetensors(st, (tmp.path / "a.safetensors").string(), o);
  // Writing from memory must not drop the pages it wrote (MADV_DONTNEED would zero them).
  CHECK(std::string(reinterpret_cast<const char*>(st.bytes()), st.file_size()) == fixture);
  speed::rewrite_safetensors(st, (tmp.path / "b.safetensors").string(), o);
  CHECK(slurp(tmp.path / "a.safetensors") == slurp(tmp.path / "b.safetensors"));
  // The same rewrite from the file (copy_file_range) gives the same bytes.
  const fs::path file = tmp.path / "fixture.safetensors";
  spit(file, fixture);
  speed::SafeTensors mapped = speed::SafeTensors::open(file.string());
  speed::rewrite_safetensors(mapped, (tmp.path / "c.safetensors").string(), o);
  CHECK(slurp(tmp.path / "c.safetensors") == slurp(tmp.path / "a.safetensors"));
}
