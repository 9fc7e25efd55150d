// Atomic outputs: temp file or folder beside the target, fsync, rename; signal-time cleanup.
#include "speed/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "speed/error.h"
#include "speed/log.h"

namespace speed {
namespace {

// Fixed storage so the signal handler touches no heap and takes no lock: a slot is claimed with
// a compare-exchange (kFree -> kClaimed), filled, then published as a file or a folder. The
// handler only removes published slots.
constexpr int kFree = 0, kFile = 1, kClaimed = 2, kDir = 3;
constexpr int kSlots = 64;
constexpr std::size_t kPathMax = 4096;
struct Slot {
  std::atomic<int> state{kFree};
  char path[kPathMax];
};
Slot g_slots[kSlots];

int register_temp(const std::string& path, int kind) {
  if (path.size() >= kPathMax) return -1;
  for (int i = 0; i < kSlots; ++i) {
    int expected = kFree;
    if (g_slots[i].state.compare_exchange_strong(expected, kClaimed)) {
      std::memcpy(g_slots[i].path, path.c_str(), path.size() + 1);
      g_slots[i].state.store(kind);
      return i;
    }
  }
  return -1;  // more than kSlots concurrent writes: still correct, just not signal-cleaned
}

void unregister_temp(int slot) {
  if (slot >= 0) g_slots[slot].state.store(kFree);
}

// Removes `name` (relative to the folder `parent`) and, for a folder, everything below it, with
// system calls only (openat, getdents64, unlinkat, close): no allocation and no lock, so that the
// signal handler can use it too. Symbolic links are removed, never followed. Another thread may
// still be creating files in the folder while a signal handler runs: entries are re-read while a
// pass removes something (at most 8 passes), so a file created meanwhile does not keep the folder
// alive. A pass that removes nothing ends the folder's passes: an entry that cannot be removed
// (deeper than kMaxDepth, no permission) costs one visit, not 8 per level above it (which made
// a 30-level folder take ~8^6 visits and a signal handler spin for good). Returns true when
// `name` is gone.
bool remove_tree_at(int parent, const char* name, int depth) {
  if (::unlinkat(parent, name, 0) == 0 || errno == ENOENT) return true;
  // Outputs are at most 3 deep; 64 levels of 2 KiB buffers is 128 KiB of stack.
  constexpr int kMaxDepth = 64;
  if (depth < kMaxDepth) {
    int fd = ::openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0) {
      alignas(8) char buf[2048];
      for (int pass = 0; pass < 8; ++pass) {
        bool removed = false;
        ::lseek(fd, 0, SEEK_SET);
        for (;;) {
          long n = ::syscall(SYS_getdents64, fd, buf, sizeof buf);
          if (n <= 0) break;
          for (long off = 0; off < n;) {
            const auto* d = reinterpret_cast<const struct dirent64*>(buf + off);
            off += d->d_reclen;
            if (std::strcmp(d->d_name, ".") == 0 || std::strcmp(d->d_name, "..") == 0) continue;
            removed = remove_tree_at(fd, d->d_name, depth + 1) || removed;
          }
        }
        if (!removed) break;
      }
      ::close(fd);
    }
  }
  return ::unlinkat(parent, name, AT_REMOVEDIR) == 0 || errno == ENOENT;
}

void remove_tree(const char* path) { remove_tree_at(AT_FDCWD, path, 0); }

extern "C" void cleanup_handler(int sig) {
  const int saved = errno;
  for (auto& s : g_slots) {
    const int state = s.state.load();
    if (state == kFile) ::unlink(s.path);
    if (state == kDir) remove_tree(s.path);
  }
  errno = saved;
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

std::string strip_slashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

mode_t current_umask() {
  mode_t m = ::umask(022);
  ::umask(m);
  return m;
}

// `<dir>/.<name>.tmp-XXXXXX` for mkostemp/mkdtemp.
std::vector<char> temp_template(const std::string& path) {
  const std::string base = base_of(path);
  std::string tmpl = path.substr(0, path.size() - base.size()) + "." + base + ".tmp-XXXXXX";
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  return name;
}

// ---- Temps left by a run that was killed (SIGKILL, OOM killer, power loss) ----
//
// Signals that can be caught remove a run's temps (cleanup_handler); SIGKILL cannot be caught, so
// a killed `full` export used to leave a hidden 2 GB `.<name>.tmp-XXXXXX` beside its output for
// good. Now every temp carries an exclusive flock(2) from its creation until it is published or
// removed (held through a descriptor of its own, so that a file closed by finish() and waiting
// for its rename stays locked). The kernel drops the lock when the process dies, however it dies.
// Before making its own temp, a writer removes the temps of the same output name that nobody
// locks. Two guards keep a live run's temp safe: a temp younger than kStaleSeconds is never
// touched (the moment between mkostemp/mkdtemp and flock), and where a lock cannot be taken at
// all (NFS maps flock to POSIX locks, which need a file open for writing) nothing is removed.
// Only temps owned by the running user are considered.
constexpr std::time_t kStaleSeconds = 30;

// `entry` == "." + base + ".tmp-" + six characters of mkstemp's alphabet.
bool is_temp_of(const char* entry, const std::string& base) {
  const std::size_t n = std::strlen(entry);
  constexpr std::size_t kSuffix = 5 + 6;  // ".tmp-" and XXXXXX
  if (n != 1 + base.size() + kSuffix || entry[0] != '.') return false;
  if (base.compare(0, base.size(), entry + 1, base.size()) != 0) return false;
  const char* tail = entry + 1 + base.size();
  if (std::strncmp(tail, ".tmp-", 5) != 0) return false;
  return std::all_of(tail + 5, tail + kSuffix, [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  });
}

bool remove_tree_at(int parent, const char* name, int depth);

// Removes the unlocked, old temps of `base` in the folder `dir`; never fails (a temp that cannot
// be examined or removed stays).
void remove_stale_temps(const std::string& dir, const std::string& base) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  const int dfd = ::dirfd(d);
  const std::time_t now = std::time(nullptr);
  while (const struct dirent* e = ::readdir(d)) {
    if (!is_temp_of(e->d_name, base)) continue;
    struct stat st {};
    if (::fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) continue;
    if (st.st_uid != ::geteuid()) continue;
    if (now - st.st_mtime < kStaleSeconds) continue;
    const int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK |
                      (S_ISDIR(st.st_mode) ? O_DIRECTORY : 0);
    const int fd = ::openat(dfd, e->d_name, flags);
    if (fd < 0) continue;
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {  // nobody writes it: its run is gone
      remove_tree_at(dfd, e->d_name, 0);
      log().info("removed '{}{}', left by an interrupted run", dir == "." ? "" : dir + "/",
                 e->d_name);
    }
    ::close(fd);
  }
  ::closedir(d);
}

// An exclusive lock on `fd`'s file held through a descriptor of its own (-1 where none can be
// taken): the temp's mark of a live run, released by close_lock() or by the process's death.
int take_lock(int fd) {
  const int lock = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (lock >= 0 && ::flock(lock, LOCK_EX | LOCK_NB) == 0) return lock;
  if (lock >= 0) ::close(lock);
  return -1;
}

void close_lock(int& lock) {
  if (lock >= 0) ::close(lock);
  lock = -1;
}

// The rename is durable only once the directory entry is on disk.
void fsync_dir(const std::string& dir) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

// temp -> path. With `noreplace`, an existing path is refused with `hint` (RENAME_NOREPLACE,
// atomic, where the kernel and filesystem have it; plain rename(2) otherwise).
void rename_into_place(const std::string& temp, const std::string& path, bool noreplace,
                       const char* hint) {
  int rc = -1;
#ifdef RENAME_NOREPLACE
  if (noreplace) {
    rc = ::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE);
    if (rc != 0 && errno == EEXIST) fail_hint(hint, "output '{}' already exists", path);
    if (rc != 0 && errno != EINVAL && errno != ENOSYS) {
      int err = errno;
      fail("cannot rename '{}' to '{}': {}", temp, path, std::strerror(err));
    }
  }
#else
  (void)noreplace, (void)hint;
#endif
  if (rc != 0 && ::rename(temp.c_str(), path.c_str()) != 0) {
    int err = errno;
    fail("cannot rename '{}' to '{}': {}", temp, path, std::strerror(err));
  }
}

// Write-out is started every kWritebackChunk bytes; at most kWritebackInFlight bytes (four
// stretches) are being written out at once; copy_file_range and the read + write fallback move at
// most kCopyChunk bytes per call. All small, since every byte between the copy and the oldest
// stretch not yet dropped is page cache the output holds, and on these machines fresh memory is
// what a copy costs (see start_writeback()).
constexpr std::uint64_t kWritebackChunk = std::uint64_t{8} << 20;
constexpr std::uint64_t kWritebackInFlight = 4 * kWritebackChunk;
constexpr std::size_t kCopyChunk = std::size_t{8} << 20;

}  // namespace

void install_cleanup_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = cleanup_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  // Every signal whose default action ends the process and that a user or a job runner sends:
  // the temps go first, then the process dies by the signal as before.
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF,
                  SIGXCPU}) {
    sigaction(sig, &sa, nullptr);
  }
  // Ignored, so that the system call fails and the run reports it or carries on: a closed pipe
  // on stderr (`2>&1 | head`) no longer kills a run halfway (writes to it just fail, and spdlog
  // drops them), and a file-size limit (`ulimit -f`) becomes a write error naming the output
  // ("File too large") whose temp is removed, instead of SIGXFSZ.
  std::signal(SIGPIPE, SIG_IGN);
  std::signal(SIGXFSZ, SIG_IGN);
}

std::size_t pending_temp_files() {
  std::size_t n = 0;
  for (auto& s : g_slots) {
    const int state = s.state.load();
    n += state == kFile || state == kDir ? 1 : 0;
  }
  return n;
}

// ---- AtomicFile ----

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
  remove_stale_temps(dir_of(path), base);
  std::vector<char> name = temp_template(path);
  fd_ = ::mkostemp(name.data(), O_CLOEXEC);
  if (fd_ < 0) {
    int err = errno;
    fail("cannot create a temporary file in '{}' for '{}': {}", dir_of(path), path, std::strerror(err));
  }
  temp_.assign(name.data());
  lock_ = take_lock(fd_);
  slot_ = register_temp(temp_, kFile);
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
  close_lock(lock_);
  unregister_temp(slot_);
  slot_ = -1;
  done_ = true;
}

void AtomicFile::fail_write(int err) const {
  fail("cannot write '{}' (temporary '{}'): {}", path_, temp_, std::strerror(err));
}

// Starts writing each full stretch of kWritebackChunk bytes to disk as soon as it is written;
// once more than kWritebackInFlight bytes are under way, waits for the oldest and drops them,
// now clean, from the page cache. Left to itself the kernel starts write-out only past
// dirty_background_ratio (2.3 GB on a 23 GB machine): a 2 GB output then sat in the page cache
// until the final fsync wrote all of it, after the copy instead of during it. This way the copy
// and the disk write overlap, dirty memory stays bounded, and fsync finds only the tail. Dropping
// the written stretches keeps the output's page cache bounded too: the next stretches reuse the
// pages just freed instead of taking 2 GB of fresh memory. On a virtual machine whose free memory
// goes back to the host, fresh memory is what a copy costs: a 2 GB `full` export took 2.5-7.9 s
// with the pages kept, 1.5-1.8 s with them dropped, and a bare 2 GB copy with fresh memory
// 2.2-2.9 s (one 32 MiB stretch in flight, 64 MiB copy steps), 1.6-2.0 s (four such stretches),
// 1.2-1.4 s (four 8 MiB stretches, 8 MiB steps; docs/performance.md, eighth session). Several
// stretches in flight keep the disk's queue fed; small ones keep the fresh memory small. The
// user's page cache is not flushed out by an output nobody has read yet either. Errors are left
// to fsync, which reports them (the kernel records a failed write-out on the file itself, so
// dropping pages hides nothing).
void AtomicFile::start_writeback() {
  if (written_ - writeback_ < kWritebackChunk) return;
  ::sync_file_range(fd_, static_cast<off64_t>(writeback_), static_cast<off64_t>(written_ - writeback_),
                    SYNC_FILE_RANGE_WRITE);
  writeback_ = written_;
  if (writeback_ - dropped_ <= kWritebackInFlight) return;
  const std::uint64_t end = writeback_ - kWritebackInFlight;
  ::sync_file_range(fd_, static_cast<off64_t>(dropped_), static_cast<off64_t>(end - dropped_),
                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
  ::posix_fadvise(fd_, static_cast<off_t>(dropped_), static_cast<off_t>(end - dropped_),
                  POSIX_FADV_DONTNEED);
  dropped_ = end;
}

void AtomicFile::write_raw(const std::uint8_t* p, std::size_t n) {
  while (n > 0) {
    std::size_t chunk = std::min(n, kCopyChunk);
    ssize_t w = ::write(fd_, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail_write(errno);
    }
    p += w;
    n -= static_cast<std::size_t>(w);
    written_ += static_cast<std::uint64_t>(w);
    start_writeback();
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
  SPEED_CHECK(!done_ && !finished_, "write to '{}' after it was finished", path_);
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

void AtomicFile::copy_from(int fd, std::uint64_t offset, std::uint64_t n) {
  SPEED_CHECK(!done_ && !finished_, "write to '{}' after it was finished", path_);
  flush();
  // In the kernel: no page faults on a mapping, no copy through user space (and on filesystems
  // that share extents, no copy at all). The output offset is the file position (NULL), so that
  // later write()s continue behind it.
  while (n > 0 && kernel_copy_ok_) {
    loff_t in = static_cast<loff_t>(offset);
    ssize_t got = ::copy_file_range(fd, &in, fd_, nullptr, std::min<std::uint64_t>(n, kCopyChunk), 0);
    if (got < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      // Not possible between these two files (another filesystem, a filesystem or kernel without
      // it): the same bytes by read + write below.
      if (err == EXDEV || err == EINVAL || err == ENOSYS || err == EOPNOTSUPP || err == ENOTSUP) {
        kernel_copy_ok_ = false;
        break;
      }
      fail_write(err);
    }
    SPEED_CHECK(got > 0, "cannot copy into '{}': the source ends before byte {} ({} more expected)",
                path_, offset, n);
    ++kernel_copies_;
    offset += static_cast<std::uint64_t>(got);
    n -= static_cast<std::uint64_t>(got);
    written_ += static_cast<std::uint64_t>(got);
    start_writeback();
  }
  while (n > 0) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(n, buf_.size()));
    ssize_t got = ::pread(fd, buf_.data(), want, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      fail("cannot read the source of '{}' at byte {}: {}", path_, offset, std::strerror(err));
    }
    SPEED_CHECK(got > 0, "cannot copy into '{}': the source ends before byte {} ({} more expected)",
                path_, offset, n);
    write_raw(buf_.data(), static_cast<std::size_t>(got));
    offset += static_cast<std::uint64_t>(got);
    n -= static_cast<std::uint64_t>(got);
  }
}

void AtomicFile::finish() {
  SPEED_CHECK(!done_, "'{}' committed twice", path_);
  if (finished_) return;
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
  finished_ = true;
  std::vector<std::uint8_t>().swap(buf_);  // a staged output waits for its rename: free 4 MiB
}

void AtomicFile::publish() {
  finish();
  rename_into_place(temp_, path_, !overwrite_, "pass --force to overwrite it");
  close_lock(lock_);
  unregister_temp(slot_);
  slot_ = -1;
  done_ = true;
  fsync_dir(dir_of(path_));
}

// ---- AtomicDir ----

AtomicDir::AtomicDir(const std::string& path, bool overwrite)
    : path_(strip_slashes(path)), overwrite_(overwrite) {
  std::string base = base_of(path_);
  SPEED_CHECK(!path_.empty() && !base.empty() && base != "." && base != "..",
              "output path '{}' does not name a folder", path);
  struct stat out {};
  if (::lstat(path_.c_str(), &out) == 0) {
    SPEED_CHECK(S_ISDIR(out.st_mode), "output '{}' exists and is not a folder", path_);
    if (!overwrite) fail_hint("pass --force to replace it", "output '{}' already exists", path_);
  }
  remove_stale_temps(dir_of(path_), base);
  std::vector<char> name = temp_template(path_);
  if (::mkdtemp(name.data()) == nullptr) {
    int err = errno;
    fail("cannot create a temporary folder in '{}' for '{}': {}", dir_of(path_), path_, std::strerror(err));
  }
  temp_.assign(name.data());
  lock_ = ::open(temp_.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (lock_ >= 0 && ::flock(lock_, LOCK_EX | LOCK_NB) != 0) close_lock(lock_);
  slot_ = register_temp(temp_, kDir);
  ::chmod(temp_.c_str(), 0777 & ~current_umask());  // mkdtemp's 0700, as for files
}

AtomicDir::~AtomicDir() {
  close_lock(lock_);
  if (slot_ < 0 && temp_.empty()) return;
  if (!temp_.empty()) remove_tree(temp_.c_str());
  unregister_temp(slot_);
}

void AtomicDir::publish() {
  SPEED_CHECK(!temp_.empty(), "'{}' published twice", path_);
  fsync_dir(temp_);  // the entries of the folders inside (files fsync their own folder)
  struct stat out {};
  const bool exists = ::lstat(path_.c_str(), &out) == 0;
  if (exists) {
    SPEED_CHECK(S_ISDIR(out.st_mode), "output '{}' exists and is not a folder", path_);
    if (!overwrite_) fail_hint("pass --force to replace it", "output '{}' already exists", path_);
  }
#ifdef RENAME_EXCHANGE
  if (exists) {
    // One step: the new folder takes the name, the old one takes the temp name (still
    // registered, so a signal during its removal below removes the rest of it).
    const int rc = ::renameat2(AT_FDCWD, temp_.c_str(), AT_FDCWD, path_.c_str(), RENAME_EXCHANGE);
    if (rc != 0 && errno != EINVAL && errno != ENOSYS) {
      int err = errno;
      fail("cannot swap '{}' in for '{}': {}", temp_, path_, std::strerror(err));
    }
    if (rc == 0) {
      fsync_dir(dir_of(path_));
      remove_tree(temp_.c_str());
      unregister_temp(slot_);
      slot_ = -1;
      temp_.clear();
      close_lock(lock_);
      return;
    }
  }
#endif
  if (exists) {
    // No RENAME_EXCHANGE on this filesystem: rename(2) cannot replace a non-empty folder, so the
    // old one moves aside first; for the moment between the two renames the name is missing.
    std::vector<char> name = temp_template(path_);
    SPEED_CHECK(::mkdtemp(name.data()) != nullptr, "cannot create a temporary folder for '{}': {}", path_,
                std::strerror(errno));
    std::string old(name.data());
    const int old_slot = register_temp(old, kDir);
    if (::rename(path_.c_str(), old.c_str()) != 0) {
      int err = errno;
      ::rmdir(old.c_str());
      unregister_temp(old_slot);
      fail("cannot move '{}' aside: {}", path_, std::strerror(err));
    }
    if (::rename(temp_.c_str(), path_.c_str()) != 0) {
      int err = errno;
      ::rename(old.c_str(), path_.c_str());
      unregister_temp(old_slot);
      fail("cannot rename '{}' to '{}': {}", temp_, path_, std::strerror(err));
    }
    unregister_temp(slot_);
    slot_ = -1;
    temp_.clear();
    close_lock(lock_);
    fsync_dir(dir_of(path_));
    remove_tree(old.c_str());
    unregister_temp(old_slot);
    return;
  }
  // Nothing at path_ (an existing folder was swapped or moved aside above): refuse a folder that
  // appeared since, never rename over it.
  rename_into_place(temp_, path_, true, "pass --force to replace it");
  unregister_temp(slot_);
  slot_ = -1;
  temp_.clear();
  close_lock(lock_);
  fsync_dir(dir_of(path_));
}

}  // namespace speed
