// Atomic output files: temp in the target directory, fsync, rename; signal-time cleanup.
#include "safetensors_atomic.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "speed/error.h"
#include "speed/safetensors.h"

namespace speed {
namespace {

// Fixed storage so the signal handler touches no heap and takes no lock: a slot is claimed with
// a compare-exchange (0 -> 2), filled, then published (1). The handler only unlinks state-1 slots.
constexpr int kSlots = 64;
constexpr std::size_t kPathMax = 4096;
struct Slot {
  std::atomic<int> state{0};
  char path[kPathMax];
};
Slot g_slots[kSlots];

int register_temp(const std::string& path) {
  if (path.size() >= kPathMax) return -1;
  for (int i = 0; i < kSlots; ++i) {
    int expected = 0;
    if (g_slots[i].state.compare_exchange_strong(expected, 2)) {
      std::memcpy(g_slots[i].path, path.c_str(), path.size() + 1);
      g_slots[i].state.store(1);
      return i;
    }
  }
  return -1;  // more than kSlots concurrent writes: still correct, just not signal-cleaned
}

void unregister_temp(int slot) {
  if (slot >= 0) g_slots[slot].state.store(0);
}

extern "C" void cleanup_handler(int sig) {
  for (auto& s : g_slots) {
    if (s.state.load() == 1) ::unlink(s.path);
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

std::string dir_of(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

std::string base_of(const std::string& path) {
  auto pos = path.find_last_of('/');
  return pos == std::string::npos ? path : path.substr(pos + 1);
}

mode_t current_umask() {
  mode_t m = ::umask(022);
  ::umask(m);
  return m;
}

}  // namespace

void install_cleanup_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = cleanup_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
}

std::size_t pending_temp_files() {
  std::size_t n = 0;
  for (auto& s : g_slots) n += s.state.load() == 1 ? 1 : 0;
  return n;
}

namespace detail {

AtomicFile::AtomicFile(const std::string& path, bool overwrite, const std::string& avoid)
    : path_(path), overwrite_(overwrite) {
  std::string base = base_of(path);
  SPEED_CHECK(!path.empty() && !base.empty() && base != "." && base != "..",
              "output path '{}' does not name a file", path);
  struct stat out {};
  if (::stat(path.c_str(), &out) == 0) {
    if (!avoid.empty()) {
      struct stat in {};
      if (::stat(avoid.c_str(), &in) == 0 && in.st_dev == out.st_dev && in.st_ino == out.st_ino) {
        fail_hint("choose another --output", "output '{}' is the input file '{}'", path, avoid);
      }
    }
    SPEED_CHECK(S_ISREG(out.st_mode), "output '{}' exists and is not a regular file", path);
    if (!overwrite) fail_hint("pass --force to overwrite it", "output '{}' already exists", path);
  }
  const std::string dir = dir_of(path);
  std::string tmpl = path.substr(0, path.size() - base.size()) + "." + base + ".tmp-XXXXXX";
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  fd_ = ::mkostemp(name.data(), O_CLOEXEC);
  if (fd_ < 0) {
    int err = errno;
    fail("cannot create a temporary file in '{}' for '{}': {}", dir, path, std::strerror(err));
  }
  temp_.assign(name.data());
  slot_ = register_temp(temp_);
  ::fchmod(fd_, 0666 & ~current_umask());  // mkstemp's 0600 would surprise users of the output
  buf_.resize(std::size_t{4} << 20);
}

AtomicFile::~AtomicFile() {
  if (!done_) abort();
}

void AtomicFile::abort() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!temp_.empty()) ::unlink(temp_.c_str());
  unregister_temp(slot_);
  slot_ = -1;
  done_ = true;
}

void AtomicFile::write_raw(const std::uint8_t* p, std::size_t n) {
  while (n > 0) {
    std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
    ssize_t w = ::write(fd_, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      fail("cannot write '{}' (temporary '{}'): {}", path_, temp_, std::strerror(err));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

void AtomicFile::flush() {
  if (used_ > 0) {
    std::size_t n = used_;
    used_ = 0;
    write_raw(buf_.data(), n);
  }
}

void AtomicFile::write(const void* data, std::size_t n) {
  SPEED_CHECK(!done_, "write to '{}' after it was finished", path_);
  const auto* p = static_cast<const std::uint8_t*>(data);
  if (n >= buf_.size()) {
    flush();
    write_raw(p, n);
    return;
  }
  if (used_ + n > buf_.size()) flush();
  std::memcpy(buf_.data() + used_, p, n);
  used_ += n;
}

void AtomicFile::commit() {
  SPEED_CHECK(!done_, "'{}' committed twice", path_);
  flush();
  if (::fsync(fd_) != 0) {
    int err = errno;
    fail("cannot flush '{}' to disk: {}", temp_, std::strerror(err));
  }
  int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    int err = errno;
    fail("cannot close '{}': {}", temp_, std::strerror(err));
  }
  int rc = -1;
#ifdef RENAME_NOREPLACE
  if (!overwrite_) {
    rc = ::renameat2(AT_FDCWD, temp_.c_str(), AT_FDCWD, path_.c_str(), RENAME_NOREPLACE);
    if (rc != 0 && errno == EEXIST) fail_hint("pass --force to overwrite it", "output '{}' already exists", path_);
    if (rc != 0 && errno != EINVAL && errno != ENOSYS) {
      int err = errno;
      fail("cannot rename '{}' to '{}': {}", temp_, path_, std::strerror(err));
    }
  }
#endif
  if (rc != 0 && ::rename(temp_.c_str(), path_.c_str()) != 0) {
    int err = errno;
    fail("cannot rename '{}' to '{}': {}", temp_, path_, std::strerror(err));
  }
  unregister_temp(slot_);
  slot_ = -1;
  done_ = true;
  // The rename is durable only once the directory entry is on disk.
  int dfd = ::open(dir_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace detail
}  // namespace speed
