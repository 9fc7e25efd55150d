// Internal tables and helpers of the concepts module.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace speed::detail {

// concepts_unicode.cc (generated): inclusive [first, last] pairs, sorted; lower-case runs
// {first, count, stride, delta}.
extern const std::uint32_t kWordRanges[];
extern const std::uint32_t kCasedRanges[];
extern const std::uint32_t kCaseIgnorableRanges[];
extern const std::int32_t kLowerRuns[];
extern const std::size_t kWordRangeCount, kCasedRangeCount, kCaseIgnorableRangeCount,
    kLowerRunCount;

bool in_ranges(const std::uint32_t* ranges, std::size_t count, std::uint32_t cp);
inline bool is_word_char(std::uint32_t cp) { return in_ranges(kWordRanges, kWordRangeCount, cp); }

// Decodes one code point at s[i] (valid UTF-8 assumed; invalid bytes decode as themselves).
std::uint32_t decode_utf8(std::string_view s, std::size_t& i);
void append_utf8(std::string& out, std::uint32_t cp);

// The file's bytes, size-limited (kMaxConceptFileBytes); errors name the file.
std::string read_file_limited(const std::string& path);

}  // namespace speed::detail
