#include "speed/log.h"

#include <mutex>

#include <spdlog/sinks/null_sink.h>

namespace speed {
namespace {
std::mutex g_mutex;
std::shared_ptr<spdlog::logger>& slot() {
  static std::shared_ptr<spdlog::logger> logger =
      std::make_shared<spdlog::logger>("speed", std::make_shared<spdlog::sinks::null_sink_mt>());
  return logger;
}
}  // namespace

spdlog::logger& log() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return *slot();
}

void set_logger(std::shared_ptr<spdlog::logger> logger) {
  if (!logger) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  slot() = std::move(logger);
}

}  // namespace speed
