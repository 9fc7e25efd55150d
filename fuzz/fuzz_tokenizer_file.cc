// libFuzzer: hostile tokenizer files, every kind the tool reads. The input's content says which:
//   starts with the gzip magic 1f 8b  -> gunzip, then the CLIP merges parser (a .txt.gz file);
//   contains a NUL byte               -> vocab.json NUL merges.txt of a diffusers tokenizer/ folder
//                                        ('#version' header required, vocab.json checked against
//                                        the vocabulary rebuilt from merges.txt);
//   otherwise                         -> CLIP merges text (bpe_simple_vocab_16e6.txt).
// The parsers run with kFuzzMerges merges instead of CLIP's 48,894: every line check, the
// vocab.json checks and the success path are the same code, but a valid file is a few hundred
// bytes (so mutations of the seeds in fuzz/corpus/fuzz_tokenizer_file reach acceptance) and one
// input costs microseconds instead of the ~13 ms a 49,408-token vocabulary costs to set up.
// Any speed::Error is a clean refusal; a crash, hang, leak or other exception is a bug. On
// acceptance the vocabulary size, the ids of a prompt and the agreement of the two BPE
// algorithms (bpe_naive, bpe_heap) on words made of the input's bytes are checked.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "speed/error.h"
#include "speed/tokenizer.h"
#include "../src/tokenizer_internal.h"

namespace {

constexpr int kFuzzMerges = 32;
// A gzip bomb is refused at this size (the real limit, 64 MiB, would make one input take seconds).
constexpr std::size_t kFuzzGunzipLimit = 1u << 20;

void check_accepted(const speed::ClipTokenizer::Impl& impl, std::string_view in) {
  const std::size_t vocab = 512 + kFuzzMerges + 2;
  if (impl.tokens.size() != vocab) std::abort();
  // Words from the input's bytes (what arbitrary text turns into after byte-level mapping):
  // both BPE algorithms must give the same symbols, each a defined token.
  for (std::size_t start = 0; start < in.size() && start < 256; start += 16) {
    std::vector<std::int32_t> word;
    for (std::size_t i = start; i < in.size() && i < start + 48; ++i) {
      word.push_back(impl.byte_id[static_cast<unsigned char>(in[i])]);
    }
    word.back() += 256;  // "</w>" glued to the last byte, as Impl::bpe does
    auto naive = word, heap = word;
    speed::tok::bpe_naive(impl.merges, naive);
    speed::tok::bpe_heap(impl.merges, heap);
    if (naive != heap) std::abort();
    for (auto id : naive) {
      if (id < 0 || static_cast<std::size_t>(id) >= vocab - 2) std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  try {
    std::unique_ptr<speed::ClipTokenizer::Impl> impl;
    if (size >= 2 && data[0] == 0x1F && data[1] == 0x8B) {
      std::string text = speed::tok::gunzip(in, "fuzz.txt.gz", kFuzzGunzipLimit);
      if (text.size() > kFuzzGunzipLimit) std::abort();
      impl = speed::tok::build_from_merges(text, "fuzz.txt.gz", false, kFuzzMerges);
    } else if (auto nul = in.find('\0'); nul != std::string_view::npos) {
      impl = speed::tok::build_from_merges(in.substr(nul + 1), "fuzz/merges.txt", true, kFuzzMerges);
      speed::tok::check_vocab_json(in.substr(0, nul), *impl, "fuzz");
    } else {
      impl = speed::tok::build_from_merges(in, "fuzz.txt", false, kFuzzMerges);
    }
    check_accepted(*impl, in);
    speed::ClipTokenizer tok(std::move(impl));
    for (auto id : tok.encode("a photo of a cat")) {
      if (id < 0 || id >= tok.vocab_size() - 2) std::abort();
    }
  } catch (const speed::Error&) {
  }
  return 0;
}
