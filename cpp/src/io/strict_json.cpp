#include "io/strict_json.h"

#include <set>
#include <vector>

#include "util/error.h"

namespace dbrx {

bool is_valid_utf8(std::string_view text) {
    const auto *s = reinterpret_cast<const unsigned char *>(text.data());
    size_t n = text.size(), i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4, cp = c & 0x07;
        } else {
            return false;  // continuation byte first, 0xC0/0xC1 overlong lead, or > 0xF4
        }
        if (n - i < len) return false;
        for (size_t k = 1; k < len; ++k) {
            unsigned cc = s[i + k];
            if ((cc & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (cc & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return false;  // overlong
        if (cp >= 0xD800 && cp <= 0xDFFF) return false;                             // surrogate
        if (cp > 0x10FFFF) return false;
        i += len;
    }
    return true;
}

nlohmann::json parse_strict_json(std::string_view text, const std::string &where) {
    if (!is_valid_utf8(text)) bad_checkpoint(where + ": not valid UTF-8");
    // A raw NUL is never valid JSON, but nlohmann's lexer takes it as the end of input and
    // would silently ignore whatever follows it.
    if (text.find('\0') != std::string_view::npos) bad_checkpoint(where + ": not valid JSON (raw NUL byte)");

    // One set of seen keys per open object; the parser reports keys in document order.
    std::vector<std::set<std::string>> open_objects;
    std::string duplicate;
    auto on_event = [&](int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json &parsed) {
        using E = nlohmann::json::parse_event_t;
        if (event == E::object_start) {
            open_objects.emplace_back();
        } else if (event == E::object_end) {
            if (!open_objects.empty()) open_objects.pop_back();
        } else if (event == E::key && !open_objects.empty() && duplicate.empty()) {
            const std::string &key = parsed.get_ref<const std::string &>();
            if (!open_objects.back().insert(key).second) duplicate = key;
        }
        return true;
    };

    nlohmann::json doc;
    try {
        doc = nlohmann::json::parse(text.begin(), text.end(), on_event, /*allow_exceptions=*/true,
                                    /*ignore_comments=*/false);
    } catch (const nlohmann::json::exception &e) {
        bad_checkpoint(where + ": not valid JSON (" + e.what() + ")");
    }
    if (!duplicate.empty()) bad_checkpoint(where + ": duplicate key \"" + duplicate + "\"");
    return doc;
}

}  // namespace dbrx
