#pragma once
namespace speed {
inline constexpr const char* kVersion = SPEED_VERSION;
}
