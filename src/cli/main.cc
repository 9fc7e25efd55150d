// speed-erase-cli, the program the speed-erase launcher (src/launch/main.cc) executes: CLI11
// wiring, logging set-up and exit codes; the work is in libspeed.
#include <malloc.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "commands.h"
#include "speed/atomic_file.h"
#include "speed/error.h"
#include "speed/log.h"
#include "speed/version.h"

namespace speed::cli {

void setup_logging(const Globals& globals) {
  auto logger = spdlog::stderr_color_mt("speed-cli");
  logger->set_pattern("%^%l%$: %v");
  logger->set_level(globals.verbosity < 0   ? spdlog::level::warn
                    : globals.verbosity > 0 ? spdlog::level::debug
                                            : spdlog::level::info);
  set_logger(logger);
}

}  // namespace speed::cli

namespace {

bool is_subcommand(const char* a) {
  for (const char* s : {"erase", "inspect", "tokenize", "encode", "eval"}) {
    if (std::strcmp(a, s) == 0) return true;
  }
  return false;
}

// One line, whatever the message carries: names taken from an input (a tensor name with a newline
// or a terminal escape in it) and LibTorch's multi-line messages get backslash escapes for their
// control characters (C0, DEL and C1), so that a script reading stderr sees one `error:` line.
std::string one_line(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    const auto next = i + 1 < s.size() ? static_cast<unsigned char>(s[i + 1]) : 0;
    char buf[8];
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else if (c == 0xc2 && next >= 0x80 && next <= 0x9f) {
      std::snprintf(buf, sizeof buf, "\\u%04x", next);
      out += buf;
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

int print_error(const std::string& message, const std::string& hint, int status) {
  std::cerr << "error: " << one_line(message) << "\n";
  if (!hint.empty()) std::cerr << "hint: " << one_line(hint) << "\n";
  return status;
}

// glibc's allocator returns freed blocks of more than 128 KiB to the kernel (mmap threshold,
// trimming of the heap top), so every d×d matrix and activation of the edit and the encoder was
// a fresh mapping, zeroed page by page by the kernel: ~20 % of a cold celebrity-100 run was
// clear_page. Large blocks now stay in the process for reuse (up to 32 MiB each, glibc's cap);
// the peak RSS is the same (the blocks are reused, not added).
void tune_allocator() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
}

// Every output is written, fsynced and renamed by now: skip LibTorch's and OpenBLAS's exit-time
// teardown (~60 ms of destructors and thread joins). Sanitizer builds exit normally, so that
// LeakSanitizer still runs.
[[noreturn]] void finish(int status) {
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& l) { l->flush(); });
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
#if defined(__SANITIZE_ADDRESS__)
  std::exit(status);
#else
  _exit(status);
#endif
}

int run_main(int argc, char** argv);

}  // namespace

int main(int argc, char** argv) {
  tune_allocator();
  finish(run_main(argc, argv));
}

namespace {

int run_main(int argc, char** argv) {
  using namespace speed::cli;
  // `erase` is implied when the first argument is not a subcommand (SPEC §3).
  std::vector<char*> args(argv, argv + argc);
  static char erase_word[] = "erase";
  if (argc > 1 && !is_subcommand(argv[1]) && std::strcmp(argv[1], "--help") != 0 &&
      std::strcmp(argv[1], "-h") != 0 && std::strcmp(argv[1], "--version") != 0) {
    args.insert(args.begin() + 1, erase_word);
  }

  CLI::App app{"speed-erase: closed-form concept erasure (SPEED) for Stable Diffusion checkpoints"};
  app.set_version_flag("--version", std::string("speed-erase ") + speed::kVersion);
  app.require_subcommand(0, 1);
  Action action;
  Globals globals;
  if (add_erase_command) add_erase_command(app, action, globals);
  if (add_inspect_command) add_inspect_command(app, action, globals);
  if (add_tokenize_command) add_tokenize_command(app, action, globals);
  if (add_encode_command) add_encode_command(app, action, globals);
  if (add_eval_command) add_eval_command(app, action, globals);

  try {
    app.parse(static_cast<int>(args.size()), args.data());
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return print_error(e.what(), "run 'speed-erase --help' for usage", 2);
  }
  if (!action) {
    std::cerr << app.help();
    return 2;
  }
  try {
    setup_logging(globals);
    speed::install_cleanup_signal_handlers();  // every command that writes a file
    return action();
  } catch (const speed::Error& e) {
    return print_error(e.what(), e.hint(), static_cast<int>(e.kind()));
  } catch (const c10::Error& e) {
    return print_error(e.what_without_backtrace(), "", 1);
  } catch (const CLI::ParseError& e) {
    return print_error(e.what(), "", 2);
  } catch (const std::bad_alloc&) {
    return print_error("out of memory", "", 1);
  } catch (const std::exception& e) {
    return print_error(e.what(), "", 1);
  }
}

}  // namespace
