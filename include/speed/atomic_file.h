// speed/atomic_file.h: outputs that appear whole or not at all (SPEC §6).
//
// AtomicFile writes `<dir>/.<name>.tmp-XXXXXX` beside the target; AtomicDir makes a temporary
// sibling folder. Both are registered for signal-time clean-up while they exist and removed on
// destruction unless published. Writing and publishing are separate steps, so that a run with
// several outputs (a checkpoint, its report, a sidecar) writes and fsyncs all of them first and
// renames them into place last: a failure before the renames leaves every existing output
// byte-identical. A temp carries an flock(2) while its run lives; one left by a run that was
// killed outright (SIGKILL, the OOM killer) is removed by the next writer of the same output,
// once nobody locks it and it is 30 s old.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace speed {

class AtomicFile {
 public:
  // Refuses an existing `path` unless `overwrite`, and always one that is not a regular file.
  // `avoid` (may be empty): a file the output must not be (compared by device and inode).
  AtomicFile(const std::string& path, bool overwrite, const std::string& avoid = {});
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();  // not published: the temp file is unlinked

  // Buffered; large blocks go straight through.
  void write(const void* data, std::size_t n);
  // Appends `n` bytes of the open file `fd` from byte `offset`, inside the kernel
  // (copy_file_range) where the two files allow it, else by read + write.
  void copy_from(int fd, std::uint64_t offset, std::uint64_t n);
  // Flushes, fsyncs and closes: the bytes are on disk under the temp name. Idempotent.
  void finish();
  // finish(), then renames the temp file to the target and fsyncs the folder.
  void publish();
  void commit() { publish(); }

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_; }
  std::uint64_t size() const { return written_ + used_; }  // bytes written so far
  bool copied_in_kernel() const { return kernel_copies_ > 0; }  // copy_from used copy_file_range

 private:
  void flush();
  void write_raw(const std::uint8_t* p, std::size_t n);
  void start_writeback();
  [[noreturn]] void fail_write(int err) const;
  void abort() noexcept;

  std::string path_, temp_;
  int fd_ = -1;
  int lock_ = -1;  // flock on the temp until it is published or removed (stale-temp clean-up)
  int slot_ = -1;
  bool overwrite_ = false;
  bool finished_ = false;
  bool done_ = false;
  bool kernel_copy_ok_ = true;
  std::size_t kernel_copies_ = 0;
  std::vector<std::uint8_t> buf_;
  std::size_t used_ = 0;
  std::uint64_t written_ = 0;     // bytes handed to the kernel
  std::uint64_t writeback_ = 0;   // bytes whose write-out was started
  std::uint64_t dropped_ = 0;     // bytes written out and dropped from the page cache
};

// A temporary folder beside `path` (`.<name>.tmp-XXXXXX`, mode 0777 & ~umask) to fill, then
// swapped in for `path` with one atomic rename (RENAME_EXCHANGE when `path` exists), after
// which the old folder is removed. Destroyed unpublished, or interrupted by SIGINT/SIGTERM/SIGHUP
// (with install_cleanup_signal_handlers()), it is removed with everything in it.
class AtomicDir {
 public:
  AtomicDir(const std::string& path, bool overwrite);
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  ~AtomicDir();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_; }
  void publish();

 private:
  std::string path_, temp_;
  int lock_ = -1;  // flock on the temp folder while it is ours
  int slot_ = -1;
  bool overwrite_ = false;
};

// Temp files and folders in progress sit in a fixed registry so that SIGINT/SIGTERM/SIGHUP (and
// SIGQUIT, SIGUSR1/2, SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU) can remove them (async-signal-safe
// system calls only) before the process dies with the signal's default action; SIGPIPE and
// SIGXFSZ are ignored (the write fails and is reported instead). The CLI calls this once at
// start-up; the library never installs handlers.
void install_cleanup_signal_handlers();
// Number of temp files and folders currently registered (tests).
std::size_t pending_temp_files();

}  // namespace speed
