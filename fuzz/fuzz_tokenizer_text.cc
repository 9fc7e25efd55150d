// libFuzzer: arbitrary bytes as a prompt through the full CLIP pipeline (UTF-8 decoding, ftfy
// subset, lower-casing, pre-tokenisation, BPE). Needs the real merges file: set
// $SPEED_ERASE_TOKENIZER (default: ../shared/data/clip/bpe_simple_vocab_16e6.txt.gz).
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "speed/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const speed::ClipTokenizer tok = [] {
    const char* env = std::getenv("SPEED_ERASE_TOKENIZER");
    return speed::ClipTokenizer::load(env ? env : "../shared/data/clip/bpe_simple_vocab_16e6.txt.gz");
  }();
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto p = tok.tokenize(text);
  if (p.n < 2 || p.n > speed::kContext) std::abort();
  for (auto id : p.ids) {
    if (id < 0 || id >= tok.vocab_size()) std::abort();
  }
  (void)speed::ClipTokenizer::normalize(text);
  return 0;
}
