// libspeed_spm_impl.so: sentencepiece behind a plain C ABI. It is loaded with
// dlmopen(LM_ID_NEWLM) by src/spm.cc because Debian's libsentencepiece embeds protobuf-lite 3.14,
// which cannot share a link namespace with LibTorch's protobuf 3.21 (build-env.md trap 2).
// Nothing C++ crosses this boundary: bytes and int32 ids in caller-owned buffers, an opaque
// handle, and error text copied into a caller buffer. No exception escapes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include <sentencepiece_processor.h>

namespace {

void set_error(char* err, std::size_t cap, const std::string& message) {
  if (err == nullptr || cap == 0) return;
  std::size_t n = message.size() < cap - 1 ? message.size() : cap - 1;
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int speed_spm_abi_version() { return 2; }

// Parses a serialized ModelProto; returns a handle, or null with the reason in err.
__attribute__((visibility("default"))) void* speed_spm_load(const char* data, std::size_t size, char* err,
                                                            std::size_t err_cap) {
  try {
    auto* sp = new sentencepiece::SentencePieceProcessor();
    auto status = sp->LoadFromSerializedProto(std::string_view(data, size));
    if (!status.ok()) {
      set_error(err, err_cap, status.ToString());
      delete sp;
      return nullptr;
    }
    return sp;
  } catch (const std::exception& e) {
    set_error(err, err_cap, e.what());
  } catch (...) {
    set_error(err, err_cap, "unknown error in sentencepiece");
  }
  return nullptr;
}

// info[0..3] = piece count, eos id, pad id, unk id (-1 where the model has none).
__attribute__((visibility("default"))) int speed_spm_info(void* handle, std::int32_t* info) {
  if (handle == nullptr || info == nullptr) return -1;
  const auto* sp = static_cast<const sentencepiece::SentencePieceProcessor*>(handle);
  info[0] = sp->GetPieceSize();
  info[1] = sp->eos_id();
  info[2] = sp->pad_id();
  info[3] = sp->unk_id();
  return 0;
}

// Encodes UTF-8 text. Returns the number of ids (only the first `cap` are written; call again
// with a larger buffer when the result exceeds cap), or -1 with the reason in err.
__attribute__((visibility("default"))) long speed_spm_encode(void* handle, const char* text, std::size_t len,
                                                             std::int32_t* out, std::size_t cap, char* err,
                                                             std::size_t err_cap) {
  if (handle == nullptr) {
    set_error(err, err_cap, "null sentencepiece handle");
    return -1;
  }
  try {
    const auto* sp = static_cast<const sentencepiece::SentencePieceProcessor*>(handle);
    std::vector<int> ids;
    auto status = sp->Encode(std::string_view(text, len), &ids);
    if (!status.ok()) {
      set_error(err, err_cap, status.ToString());
      return -1;
    }
    for (std::size_t i = 0; i < ids.size() && i < cap; ++i) out[i] = ids[i];
    return static_cast<long>(ids.size());
  } catch (const std::exception& e) {
    set_error(err, err_cap, e.what());
  } catch (...) {
    set_error(err, err_cap, "unknown error in sentencepiece");
  }
  return -1;
}

__attribute__((visibility("default"))) void speed_spm_free(void* handle) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(handle);
}

}  // extern "C"
