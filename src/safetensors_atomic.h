// Internal: a temp file in the target directory that becomes `path` on commit() (fsync +
// rename) and is unlinked otherwise, registered for signal-time cleanup while it exists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace speed::detail {

class AtomicFile {
 public:
  // `avoid` (may be empty): a file the output must not be (compared by device and inode).
  AtomicFile(const std::string& path, bool overwrite, const std::string& avoid = {});
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  void write(const void* data, std::size_t n);  // buffered; large blocks go straight through
  void commit();
  const std::string& temp_path() const { return temp_; }

 private:
  void flush();
  void write_raw(const std::uint8_t* p, std::size_t n);
  void abort() noexcept;

  std::string path_, temp_;
  int fd_ = -1;
  int slot_ = -1;
  bool overwrite_ = false;
  bool done_ = false;
  std::vector<std::uint8_t> buf_;
  std::size_t used_ = 0;
};

}  // namespace speed::detail
