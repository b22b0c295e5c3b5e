// Whole-file reads for the small text files of a checkpoint (config.json, generation_config.json,
// the shard index).
#pragma once

#include <string>

namespace dbrx {

// The bytes of the file at `path`. Throws DBRX_ERR_IO "<path>: cannot open" or "<path>: read failed".
std::string read_file(const std::string &path);

}  // namespace dbrx
