// The embedding cache. An entry stores the ids it was computed from and a checksum over all of
// its bytes, so a truncated, corrupt or colliding entry is detected and recomputed, never used.
//
// Layout (little-endian): "SPEEDEMB", u32 version, u32 mode, u32 elem_size, u32 n_ids, u32 rows,
// u32 0, u64 width, u64 payload bytes, i32 ids[n_ids], payload, u64 XXH64(everything before).
#include "embed_cache.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "speed/log.h"

namespace speed {
// From speed/tensor.h, declared here to keep this file free of ATen (compile time).
std::uint64_t hash64(const void* data, std::size_t n, std::uint64_t seed);
std::string hex64(std::uint64_t h);
}  // namespace speed

namespace speed::embed_detail {
namespace {

namespace fs = std::filesystem;

constexpr char kMagic[8] = {'S', 'P', 'E', 'E', 'D', 'E', 'M', 'B'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeader = 8 + 6 * 4 + 8 + 8;

template <typename T>
void put_le(std::string& s, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  s.append(b, sizeof(T));
}

std::uint64_t key_hash(const CacheKey& k) {
  std::string s;
  put_le(s, k.mode);
  put_le(s, k.elem_size);
  put_le(s, k.rows);
  put_le(s, k.width);
  s.append(reinterpret_cast<const char*>(k.ids.data()), k.ids.size() * sizeof(std::int32_t));
  return hash64(s.data(), s.size(), 0);
}

std::string header_of(const CacheKey& k) {
  std::string s(kMagic, 8);
  put_le(s, kVersion);
  put_le(s, k.mode);
  put_le(s, k.elem_size);
  put_le(s, static_cast<std::uint32_t>(k.ids.size()));
  put_le(s, k.rows);
  put_le(s, std::uint32_t{0});
  put_le(s, k.width);
  put_le(s, k.payload_bytes());
  s.append(reinterpret_cast<const char*>(k.ids.data()), k.ids.size() * sizeof(std::int32_t));
  return s;
}

}  // namespace

std::string encode_entry(const CacheKey& key, const void* data) {
  std::string s = header_of(key);
  s.append(static_cast<const char*>(data), key.payload_bytes());
  put_le(s, hash64(s.data(), s.size(), 0));
  return s;
}

EmbedCache::EmbedCache(std::string root, std::string model_hash)
    : dir_((fs::path(root) / "v1" / model_hash).string()) {}

std::string EmbedCache::entry_path(const CacheKey& key) const {
  const std::string h = hex64(key_hash(key));
  return (fs::path(dir_) / h.substr(0, 2) / (h + ".emb")).string();
}

bool EmbedCache::get(const CacheKey& key, void* out) const {
  const std::string path = entry_path(key);
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) return false;  // no entry
  const std::string head = header_of(key);
  const std::uint64_t want = head.size() + key.payload_bytes() + 8;
  auto corrupt = [&](const char* why) {
    log().warn("embedding cache entry '{}' is corrupt ({}); recomputing it", path, why);
    return false;
  };
  if (size != want) return corrupt("wrong size");
  std::string bytes(want, '\0');
  std::ifstream in(path, std::ios::binary);
  if (!in.read(bytes.data(), static_cast<std::streamsize>(want))) return corrupt("short read");
  std::uint64_t sum;
  std::memcpy(&sum, bytes.data() + want - 8, 8);
  if (sum != hash64(bytes.data(), want - 8, 0)) return corrupt("checksum mismatch");
  // Same key hash but another key (a collision, or another format version): not ours.
  if (bytes.compare(0, head.size(), head) != 0) return corrupt("key mismatch");
  std::memcpy(out, bytes.data() + head.size(), key.payload_bytes());
  return true;
}

void EmbedCache::put(const CacheKey& key, const void* data) {
  if (!writable_) return;
  static std::atomic<unsigned> counter{0};
  const fs::path path = entry_path(key);
  const fs::path tmp = path.parent_path() / fmt::format(".{}.{}.{}.tmp", path.filename().string(),
                                                       ::getpid(), counter++);
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  const std::string bytes = encode_entry(key, data);
  bool ok = !ec;
  if (ok) {
    std::ofstream o(tmp, std::ios::binary | std::ios::trunc);
    ok = static_cast<bool>(o.write(bytes.data(), static_cast<std::streamsize>(bytes.size())));
    o.close();
    ok = ok && !o.fail();
  }
  // rename() is atomic: readers see the old entry or the complete new one, never a partial file.
  if (ok) {
    fs::rename(tmp, path, ec);
    ok = !ec;
  }
  if (!ok) {
    fs::remove(tmp, ec);
    writable_ = false;
    log().warn("cannot write the embedding cache in '{}'; continuing without writing it", dir_);
  }
}

}  // namespace speed::embed_detail
