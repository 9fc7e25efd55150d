// libFuzzer: hostile tokenizer files. The input is a merges file, or (when it contains a NUL
// byte) vocab.json NUL merges.txt of a diffusers tokenizer/ folder. Any speed::Error is fine;
// a crash, hang or other exception is a bug. Seed with the real files' first lines.
#include <cstdint>
#include <string_view>

#include "speed/error.h"
#include "speed/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  try {
    auto nul = in.find('\0');
    if (nul == std::string_view::npos) {
      auto t = speed::ClipTokenizer::from_merges_text(in, "fuzz");
      (void)t.tokenize("a photo of a cat");
    } else {
      auto t = speed::ClipTokenizer::from_diffusers_text(in.substr(0, nul), in.substr(nul + 1), "fuzz");
      (void)t.tokenize("a photo of a cat");
    }
  } catch (const speed::Error&) {
  }
  return 0;
}
