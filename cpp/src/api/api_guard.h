// Nothing crosses the C boundary: every exported function runs its body through guarded(), which
// turns exceptions into a status and the thread-local text dbrx_last_error() returns.
#pragma once

#include <new>
#include <string>

#include "dbrx/dbrx.h"
#include "util/error.h"

namespace dbrx::api {

void set_last_error(const std::string &message);

template <typename F>
dbrx_status guarded(const char *function, F &&body) noexcept {
    try {
        body();
        return DBRX_OK;
    } catch (const Error &e) {
        set_last_error(std::string(function) + ": " + e.what());
        return e.status();
    } catch (const std::bad_alloc &) {
        set_last_error(std::string(function) + ": out of host memory");
        return DBRX_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        set_last_error(std::string(function) + ": internal error: " + e.what());
        return DBRX_ERR_INTERNAL;
    } catch (...) {
        set_last_error(std::string(function) + ": internal error: unknown exception");
        return DBRX_ERR_INTERNAL;
    }
}

template <typename T>
void require(const T *pointer, const char *name) {
    if (pointer == nullptr) invalid_argument(std::string(name) + " is NULL");
}

}  // namespace dbrx::api
