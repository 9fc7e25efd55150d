// Internal to the embed module: the on-disk embedding cache (one checksummed file per prompt).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace speed::embed_detail {

// What one entry holds: the encoder output rows for one id sequence in one mode.
struct CacheKey {
  std::uint32_t mode = 0;        // 0 last-subject row, 1 all 77 rows
  std::uint32_t elem_size = 4;   // 4 float32, 8 float64
  std::vector<std::int32_t> ids; // the ids the rows depend on (0..j, or all 77)
  std::uint32_t rows = 1;
  std::uint64_t width = 0;
  std::uint64_t payload_bytes() const { return std::uint64_t{rows} * width * elem_size; }
};

class EmbedCache {
 public:
  // Entries live in <root>/v1/<model_hash>/<xx>/<key hash>.emb.
  EmbedCache(std::string root, std::string model_hash);

  // Fills `out` (key.payload_bytes()) from a valid entry. A missing entry returns false; a
  // corrupt, truncated or mismatching one is logged and returns false (it is recomputed).
  bool get(const CacheKey& key, void* out) const;
  // Writes atomically (temp file in the same folder + rename), so concurrent runs never see a
  // partial entry. I/O failures are logged once and disable further writes.
  void put(const CacheKey& key, const void* data);

  std::string entry_path(const CacheKey& key) const;

 private:
  std::string dir_;
  bool writable_ = true;
};

std::string encode_entry(const CacheKey& key, const void* data);

}  // namespace speed::embed_detail
