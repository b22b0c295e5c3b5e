#include "io/read_file.h"

#include <fstream>
#include <sstream>

#include "util/error.h"

namespace dbrx {

std::string read_file(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(DBRX_ERR_IO, path + ": cannot open");
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) fail(DBRX_ERR_IO, path + ": read failed");
    return ss.str();
}

}  // namespace dbrx
