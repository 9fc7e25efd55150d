// speed/error.h: the one exception type of libspeed and the SPEED_CHECK macro.
//
// Messages follow one grammar: lower case, names and paths in '...', got/expected numbers:
//   tensor 'encoder.layers.3.self_attn.k_proj.weight' has shape [768, 512], expected [768, 768]
// An optional hint (the remedy) travels with the error; the CLI prints it as "hint: ...".
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace speed {

// Exit-status class of an error: usage errors exit 2, everything else 1 (SPEC §3).
enum class ErrorKind { Failure = 1, Usage = 2 };

class Error : public std::runtime_error {
 public:
  explicit Error(std::string message, std::string hint = {}, ErrorKind kind = ErrorKind::Failure)
      : std::runtime_error(std::move(message)), hint_(std::move(hint)), kind_(kind) {}
  const std::string& hint() const noexcept { return hint_; }
  ErrorKind kind() const noexcept { return kind_; }

 private:
  std::string hint_;
  ErrorKind kind_;
};

// Usage errors (bad option values and combinations): exit status 2.
class UsageError : public Error {
 public:
  explicit UsageError(std::string message, std::string hint = {})
      : Error(std::move(message), std::move(hint), ErrorKind::Usage) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void fail_hint(std::string hint, fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...), std::move(hint));
}

}  // namespace speed

// SPEED_CHECK(cond, "format {}", args...): throws speed::Error with the formatted message.
#define SPEED_CHECK(cond, ...)       \
  do {                               \
    if (!(cond)) {                   \
      ::speed::fail(__VA_ARGS__);    \
    }                                \
  } while (0)
