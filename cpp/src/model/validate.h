// Checks every backend built on the CPU kernels shares (the one-rank and the sharded CPU backend):
// the model config it can run, and one forward step's inputs. `backend` names the caller in messages
// ("CPU backend", "sharded CPU backend").
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "io/model_config.h"
#include "model/backend.h"

namespace dbrx {

// Throws DBRX_ERR_BAD_CHECKPOINT "<backend>: config ..." when a dimension is non-positive or
// inconsistent, or when the config's layer count differs from the checkpoint's.
void check_backend_config(const ModelConfig &c, int64_t n_layers_in_checkpoint, const std::string &backend);

// Throws DBRX_ERR_INVALID_ARGUMENT "<backend> forward: batch[i]: ..." when a step has no tokens, a
// negative pos0, positions past max_seq_len, a block table too short or naming blocks outside the
// pool, or token ids outside the vocabulary; and when logits are wanted but `logits` is null.
void check_forward_steps(const ModelConfig &c, std::span<const SeqStep> batch, const KvPool &pool,
                         const float *logits, const std::string &backend);

}  // namespace dbrx
