#include "model/validate.h"

#include "util/error.h"

namespace dbrx {

void check_backend_config(const ModelConfig &c, int64_t n_layers_in_checkpoint, const std::string &backend) {
    auto bad = [&](const std::string &m) { bad_checkpoint(backend + ": config " + m); };
    if (c.d_model <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_layers <= 0 || c.vocab_size <= 0 ||
        c.ffn_hidden <= 0 || c.n_experts <= 0 || c.max_seq_len <= 0)
        bad("has a non-positive dimension");
    if (c.head_dim * c.n_heads != c.d_model || c.head_dim % 2 != 0)
        bad("head_dim " + std::to_string(c.head_dim) + " must be even and d_model / n_heads");
    if (c.n_heads % c.n_kv_heads != 0)
        bad("n_heads " + std::to_string(c.n_heads) + " is not a multiple of kv_n_heads " + std::to_string(c.n_kv_heads));
    if (c.top_k < 1 || c.top_k > c.n_experts)
        bad("moe_top_k " + std::to_string(c.top_k) + " outside [1, " + std::to_string(c.n_experts) + "]");
    if (c.moe_norm_p && !(*c.moe_norm_p > 0)) bad("moe_normalize_expert_weights must be positive");
    if (n_layers_in_checkpoint != c.n_layers)
        bad("says " + std::to_string(c.n_layers) + " layers, the checkpoint has " +
            std::to_string(n_layers_in_checkpoint));
}

void check_forward_steps(const ModelConfig &c, std::span<const SeqStep> batch, const KvPool &pool,
                         const float *logits, const std::string &backend) {
    const int64_t bs = pool.block_size(), n_blocks = pool.n_blocks();
    bool any_logits = false;
    for (size_t s = 0; s < batch.size(); ++s) {
        const SeqStep &st = batch[s];
        const std::string where = backend + " forward: batch[" + std::to_string(s) + "]: ";
        if (st.tokens.empty()) invalid_argument(where + "no tokens");
        if (st.pos0 < 0) invalid_argument(where + "negative pos0 " + std::to_string(st.pos0));
        const int64_t end = int64_t{st.pos0} + static_cast<int64_t>(st.tokens.size());
        if (end > c.max_seq_len)
            invalid_argument(where + "positions up to " + std::to_string(end) + " exceed max_seq_len " +
                             std::to_string(c.max_seq_len));
        if (static_cast<int64_t>(st.blocks.size()) * bs < end)
            invalid_argument(where + "block table of " + std::to_string(st.blocks.size()) + " blocks of " +
                             std::to_string(bs) + " cannot hold " + std::to_string(end) + " positions");
        // Only the blocks the step reaches must be valid: the table may be longer than the sequence.
        const int64_t used_blocks = (end + bs - 1) / bs;
        for (int64_t b = 0; b < used_blocks; ++b)
            if (st.blocks[b] < 0 || st.blocks[b] >= n_blocks)
                invalid_argument(where + "block id " + std::to_string(st.blocks[b]) + " at index " + std::to_string(b) +
                                 " outside [0, " + std::to_string(n_blocks) + ")");
        for (size_t i = 0; i < st.tokens.size(); ++i)
            if (st.tokens[i] < 0 || st.tokens[i] >= c.vocab_size)
                invalid_argument(where + "token id " + std::to_string(st.tokens[i]) + " at index " + std::to_string(i) +
                                 " outside [0, " + std::to_string(c.vocab_size) + ")");
        any_logits |= st.want_logits;
    }
    if (any_logits && !logits) invalid_argument(backend + " forward: logits requested but the output is null");
}

}  // namespace dbrx
