// Errors inside the runtime are exceptions carrying a dbrx_status; the C API boundary
// (cpp/src/api) turns them into a status plus dbrx_last_error() text. Nothing throws past it.
#pragma once

#include <stdexcept>
#include <string>

#include "dbrx/dbrx.h"

namespace dbrx {

class Error : public std::runtime_error {
public:
    Error(dbrx_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    dbrx_status status() const noexcept { return status_; }

private:
    dbrx_status status_;
};

[[noreturn]] inline void fail(dbrx_status status, const std::string &message) { throw Error(status, message); }
[[noreturn]] inline void invalid_argument(const std::string &message) { fail(DBRX_ERR_INVALID_ARGUMENT, message); }
[[noreturn]] inline void bad_checkpoint(const std::string &message) { fail(DBRX_ERR_BAD_CHECKPOINT, message); }

}  // namespace dbrx
