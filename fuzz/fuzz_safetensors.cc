// libFuzzer: safetensors header parser + checkpoint layout detection + describe, on arbitrary
// bytes. Invariants checked beyond "no crash": every accepted tensor lies inside the buffer, and
// re-serialising an accepted header with make_header() parses back to the same tensors.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "speed/checkpoint.h"
#include "speed/error.h"
#include "speed/safetensors.h"

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::shared_ptr<const speed::SafeTensors> st;
  try {
    st = std::make_shared<const speed::SafeTensors>(
        speed::SafeTensors::from_memory(std::string(reinterpret_cast<const char*>(data), size), "fuzz"));
  } catch (const speed::Error&) {
    return 0;
  }
  std::uint64_t sum = 0;
  std::vector<speed::TensorData> again;
  for (const auto& t : st->tensors()) {
    check(t.begin <= t.end && st->data_start() + t.end <= st->file_size(), "tensor inside the buffer");
    const std::uint8_t* p = st->data(t);
    if (t.nbytes() > 0) sum += p[0] + p[t.nbytes() - 1];  // ASan flags any out-of-bounds byte
    again.push_back({t.name, t.dtype, t.shape, p, static_cast<std::size_t>(t.nbytes())});
  }
  check(sum < (1ull << 62), "sum");
  try {
    std::string header = speed::make_header(again, st->metadata());
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    bytes += header;
    for (const auto& t : again) bytes.append(static_cast<const char*>(t.data), t.nbytes);
    auto back = speed::SafeTensors::from_memory(std::move(bytes), "roundtrip");
    check(back.tensors().size() == st->tensors().size(), "round trip count");
    check(back.metadata() == st->metadata(), "round trip metadata");
    for (std::size_t i = 0; i < again.size(); ++i) {
      const auto& a = st->tensors()[i];
      const auto& b = back.tensors()[i];
      check(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.nbytes() == b.nbytes(), "round trip entry");
      check(std::memcmp(st->data(a), back.data(b), a.nbytes()) == 0, "round trip bytes");
    }
  } catch (const speed::Error&) {
    // make_header may refuse what the reader accepts only for headers over the size limit.
  }
  try {
    auto ck = speed::detect_checkpoint(st, "fuzz");
    check(!ck.kv.empty() && ck.kv.size() % 2 == 0, "kv pairs");
    for (const auto& l : ck.kv) check(st->find(l.source) != nullptr, "kv source exists");
    auto j = speed::describe_checkpoint(ck);
    (void)j.dump();
    (void)speed::describe_checkpoint_text(ck);
  } catch (const speed::Error&) {
  }
  return 0;
}
