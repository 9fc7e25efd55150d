// tests/test_support.h: small helpers shared by several test binaries (header-only: each test
// binary compiles only its own test_<module>*.cpp files). Include after <catch2/catch.hpp>.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <system_error>

#include "speed/error.h"

namespace speed::test {

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "speed-test") {
    std::string t = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

// The whole file as bytes ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Runs fn and requires a speed::Error whose message contains `substring`.
inline void require_error(const std::function<void()>& fn, const std::string& substring) {
  try {
    fn();
    FAIL("expected an error containing '" << substring << "'");
  } catch (const speed::Error& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(substring) != std::string::npos);
  }
}

}  // namespace speed::test
