// JSON parsing for files that come from strangers: duplicate keys (at any depth) and invalid
// UTF-8 are errors, because lenient parsers keep the first or the last duplicate silently and
// two tools could then disagree about what the file says.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace dbrx {

// Parses `text` as one JSON document (surrounding whitespace allowed). On failure throws
// dbrx::Error(DBRX_ERR_BAD_CHECKPOINT) with the text "<where>: <what was wrong>".
nlohmann::json parse_strict_json(std::string_view text, const std::string &where);

// True when `text` is well-formed UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF).
bool is_valid_utf8(std::string_view text);

}  // namespace dbrx
