// speed/atomic_file.h: copy_from in the kernel and by read + write (same bytes), staged files
// published late, AtomicDir swapping a folder in and cleaning up, temps locked while their run
// lives and removed by the next writer once it is dead; rewrite from a from_memory source leaves
// that source intact.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <ctime>
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

namespace {

// Sets `p`'s modification time `seconds` into the past (without following a link).
void age(const fs::path& p, int seconds) {
  const struct timespec t[2] = {{std::time(nullptr) - seconds, 0}, {std::time(nullptr) - seconds, 0}};
  REQUIRE(::utimensat(AT_FDCWD, p.c_str(), t, AT_SYMLINK_NOFOLLOW) == 0);
}

// Whether some other open file description holds an flock on `p`.
bool locked(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  const bool busy = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return busy;
}

}  // namespace

TEST_CASE("atomic file: a temp is locked from creation until it is published", "[unit]") {
  TempDir tmp("speed-atomic");
  const fs::path out = tmp.path / "out.bin";
  speed::AtomicFile f(out.string(), false);
  f.write("abc", 3);
  CHECK(locked(f.temp_path()));
  f.finish();  // closed, waiting for its rename: still locked
  CHECK(locked(f.temp_path()));
  f.publish();
  CHECK_FALSE(locked(out));
  speed::AtomicDir d((tmp.path / "model").string(), false);
  CHECK(locked(d.temp_path()));
  d.publish();
  CHECK_FALSE(locked(tmp.path / "model"));
}

TEST_CASE("atomic file and dir: temps left by a killed run are removed by the next writer",
          "[unit]") {
  TempDir tmp("speed-atomic");
  const fs::path out = tmp.path / "out.safetensors";
  const fs::path stale_file = tmp.path / ".out.safetensors.tmp-AbC123";
  const fs::path stale_dir = tmp.path / ".out.safetensors.tmp-Zz9999";
  const fs::path young = tmp.path / ".out.safetensors.tmp-young1";
  const fs::path held = tmp.path / ".out.safetensors.tmp-held00";
  const fs::path other = tmp.path / ".other.safetensors.tmp-abcdef";  // another output's
  const fs::path short_name = tmp.path / ".out.safetensors.tmp-abc";  // not mkstemp's pattern
  const fs::path link = tmp.path / ".out.safetensors.tmp-link00";
  spit(stale_file, "left by a killed run");
  fs::create_directories(stale_dir / "unet");
  spit(stale_dir / "unet" / "x.bin", "x");
  for (const fs::path& p : {young, held, other, short_name}) spit(p, "keep");
  fs::create_symlink(tmp.path / "other-target", link);
  for (const fs::path& p : {stale_file, stale_dir, held, other, short_name, link}) age(p, 120);
  const int hold = ::open(held.c_str(), O_RDONLY | O_CLOEXEC);  // a live run's temp
  REQUIRE(hold >= 0);
  REQUIRE(::flock(hold, LOCK_EX | LOCK_NB) == 0);
  {
    speed::AtomicFile f(out.string(), false);
    f.write("new", 3);
    f.publish();
  }
  ::close(hold);
  CHECK_FALSE(fs::exists(stale_file));
  CHECK_FALSE(fs::exists(stale_dir));
  for (const fs::path& p : {young, held, other, short_name}) CHECK(slurp(p) == "keep");
  CHECK(fs::is_symlink(link));
  CHECK(slurp(out) == "new");

  // A folder output: the same for its temps.
  const fs::path model = tmp.path / "model";
  const fs::path stale_model = tmp.path / ".model.tmp-q1W2e3";
  fs::create_directories(stale_model / "text_encoder");
  spit(stale_model / "text_encoder" / "model.safetensors", "partial");
  age(stale_model, 120);
  speed::AtomicDir d(model.string(), false);
  CHECK_FALSE(fs::exists(stale_model));
  CHECK(fs::exists(d.temp_path()));
}

TEST_CASE("atomic dir: deep stale temps are removed, and one too deep for that costs no time",
          "[unit]") {
  TempDir tmp;
  const fs::path model = tmp.path / "model";
  auto nest = [&](const fs::path& top, int depth) {
    fs::path p = top;
    for (int i = 0; i < depth; ++i) p /= "d";
    fs::create_directories(p);
    spit(p / "x.bin", "x");
    age(top, 120);
  };
  const fs::path deep = tmp.path / ".model.tmp-Deep40";
  nest(deep, 40);  // a copy that followed a link loop once left folders this deep
  {
    speed::AtomicDir d(model.string(), false);
    CHECK_FALSE(fs::exists(deep));
  }
  // Beyond the remover's depth bound the innermost levels stay; before, each level above them
  // was re-read 8 times (8^n visits: a hang, also inside the signal handler).
  const fs::path too_deep = tmp.path / ".model.tmp-Deep80";
  nest(too_deep, 80);
  const auto t0 = std::chrono::steady_clock::now();
  { speed::AtomicDir d(model.string(), false); }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(seconds < 10.0);  // a bound on a hang, not a timing: it takes milliseconds
  std::error_code ec;
  fs::remove_all(too_deep, ec);
}

TEST_CASE("atomic file: the temp of a run killed by SIGKILL is removed by the next run", "[unit]") {
  TempDir tmp("speed-atomic");
  const fs::path out = tmp.path / "out.bin";
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    speed::AtomicFile f(out.string(), false);
    f.write("partial", 7);
    f.finish();
    ::kill(::getpid(), SIGKILL);  // no destructor, no handler: the temp stays behind
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGKILL);
  std::vector<fs::path> left(fs::directory_iterator(tmp.path), fs::directory_iterator());
  REQUIRE(left.size() == 1);
  CHECK(left[0].filename().string().rfind(".out.bin.tmp-", 0) == 0);
  CHECK_FALSE(locked(left[0]));  // the kernel dropped the dead run's lock
  {
    speed::AtomicFile young(out.string(), false);  // under 30 s old: left alone
    CHECK(fs::exists(left[0]));
  }
  age(left[0], 60);
  {
    speed::AtomicFile f(out.string(), false);
    CHECK_FALSE(fs::exists(left[0]));
    f.write("whole", 5);
    f.publish();
  }
  CHECK(slurp(out) == "whole");
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
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
