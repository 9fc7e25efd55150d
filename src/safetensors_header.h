// Internal: the streaming (SAX) safetensors header parser. No DOM is built, so hostile headers
// cost time and memory linear in their size (an ordered DOM would be quadratic in the key count).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "speed/safetensors.h"

namespace speed {

// A rejection; the caller prefixes the file name.
struct HeaderReject {
  std::string message;
};

namespace detail {

// Parses and validates the JSON text: object shape, field types, dtypes, shapes (rank, overflow),
// span = numel x itemsize, duplicate keys, kMaxTensors. Offsets tiling is checked by the caller.
void parse_header_json(const char* text, std::size_t n, std::vector<TensorInfo>& tensors, Metadata& metadata);

// Printable, bounded rendering of a hostile string for messages.
std::string shown(std::string_view s);

}  // namespace detail
}  // namespace speed
