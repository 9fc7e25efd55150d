// libFuzzer: hostile JSON presets (SPEC §3: a JSON object whose keys are the long option names).
// A speed::Error (usage errors included) is a clean refusal; a crash, a hang, any other
// exception or a parsed preset that breaks the documented types (abort() below) is a bug.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "speed/concepts.h"
#include "speed/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  try {
    speed::Preset p = speed::parse_preset(in, "fuzz.json");
    if (p.seed && *p.seed < 0) std::abort();  // documented: refused
    for (const auto& s : p.concept_sources)
      if (!speed::is_valid_utf8(s)) std::abort();
    for (const auto& s : p.retain)
      if (!speed::is_valid_utf8(s)) std::abort();
  } catch (const speed::Error&) {
  }
  return 0;
}
