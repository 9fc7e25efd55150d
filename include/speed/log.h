// speed/log.h: libspeed logs through one named spdlog logger ("speed"); it never configures
// sinks. The host (the CLI, a test) installs sinks with set_logger(); by default messages go to
// a null sink.
#pragma once

#include <memory>

#include <spdlog/spdlog.h>

namespace speed {

// The library's logger. Never null.
spdlog::logger& log();

// Replaces the library's logger (e.g. a stderr sink chosen by the CLI).
void set_logger(std::shared_ptr<spdlog::logger> logger);

}  // namespace speed
