// A one-line progress bar on stderr for the erase and eval commands: drawn only when stderr is a
// terminal and output is not quiet (scripts and CI logs get the stage log lines only).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "speed/app.h"

namespace speed::cli {

class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled && ::isatty(STDERR_FILENO) == 1) {}
  ~Progress() { finish(); }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void update(const ProgressEvent& ev) {
    if (!enabled_ || ev.total <= 0) return;
    if (ev.stage != stage_) {
      finish();
      stage_ = ev.stage;
    }
    constexpr int kWidth = 30;
    int filled = static_cast<int>(kWidth * ev.done / ev.total);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::fprintf(stderr, "\r%-7s [%s] %lld/%lld", ev.stage.c_str(), bar.c_str(),
                 static_cast<long long>(ev.done), static_cast<long long>(ev.total));
    std::fflush(stderr);
    drawn_ = true;
    if (ev.done >= ev.total) finish();
  }

  // Ends the current bar's line so that log lines start on a fresh one.
  void finish() {
    if (drawn_) std::fputc('\n', stderr);
    drawn_ = false;
    stage_.clear();
  }

 private:
  bool enabled_;
  bool drawn_ = false;
  std::string stage_;
};

}  // namespace speed::cli
