/* dbrx4j runtime: the C API.
 *
 * The only surface the JVM (or any other caller) sees. Plain C, no STL, no exceptions:
 * every function that can fail returns a dbrx_status, and dbrx_last_error() (thread-local)
 * says what went wrong and where. No C++ exception and no abort() crosses this header.
 *
 * Objects: a dbrx_model (weights, read-only, shareable) and a dbrx_engine (KV cache,
 * scheduler, its own worker thread). Callers submit requests to an engine and poll for
 * their tokens; no native thread ever calls back into the caller.
 *
 * Parameters travel as structs whose defaults come from dbrx_*_default_params(), so new
 * fields can be added at the end without breaking callers that start from the defaults.
 */
#ifndef DBRX_H
#define DBRX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(DBRX_BUILD_SHARED)
#define DBRX_API __attribute__((visibility("default")))
#else
#define DBRX_API
#endif

#define DBRX_MAX_TOP_LOGPROBS 20
#define DBRX_MAX_STOP_IDS 16
#define DBRX_MAX_DEVICES 16

typedef enum dbrx_status {
    DBRX_OK = 0,
    DBRX_ERR_INVALID_ARGUMENT = 1, /* a parameter is out of range, a pointer is null, ... */
    DBRX_ERR_BAD_CHECKPOINT = 2,   /* malformed config, safetensors file or missing/misshapen tensor */
    DBRX_ERR_IO = 3,               /* a file could not be opened, read or mapped */
    DBRX_ERR_OUT_OF_MEMORY = 4,    /* host or device memory exhausted */
    DBRX_ERR_UNSUPPORTED = 5,      /* valid, but not supported by this build or device */
    DBRX_ERR_QUEUE_FULL = 6,       /* the engine's waiting queue is at its configured limit */
    DBRX_ERR_NOT_FOUND = 7,        /* unknown request id */
    DBRX_ERR_TIMEOUT = 8,          /* a wait ended before anything happened */
    DBRX_ERR_ENGINE_DEAD = 9,      /* the engine hit an internal failure and stopped */
    DBRX_ERR_INTERNAL = 10         /* a bug: please report the message */
} dbrx_status;

typedef enum dbrx_device {
    DBRX_DEVICE_CPU = 0,
    DBRX_DEVICE_CUDA = 1
} dbrx_device;

typedef enum dbrx_finish_reason {
    DBRX_FINISH_NONE = 0,      /* still running */
    DBRX_FINISH_STOP = 1,      /* a stop token was sampled */
    DBRX_FINISH_LENGTH = 2,    /* max_tokens reached, or the context is full */
    DBRX_FINISH_CANCELLED = 3, /* dbrx_engine_cancel() */
    DBRX_FINISH_ERROR = 4      /* the request failed; dbrx_engine_poll sets the error text */
} dbrx_finish_reason;

/* ---- errors and version ---- */

/* Text of the last failure on this thread ("" when none). Valid until the next failing call. */
DBRX_API const char *dbrx_last_error(void);
DBRX_API const char *dbrx_status_name(dbrx_status status);
DBRX_API const char *dbrx_version(void);
/* True when this build contains the CUDA backend and a CUDA device is visible. */
DBRX_API bool dbrx_cuda_available(void);

/* ---- model ---- */

typedef struct dbrx_model dbrx_model;

/* Load progress in [0, 1], called on the thread that called dbrx_model_load.
 * Return false to abort the load (dbrx_model_load then fails with DBRX_ERR_INVALID_ARGUMENT). */
typedef bool (*dbrx_progress_fn)(float progress, void *user_data);

typedef struct dbrx_model_params {
    dbrx_device device;          /* default DBRX_DEVICE_CPU */
    int32_t device_id;           /* first CUDA device; default 0 */
    int32_t n_threads;           /* CPU backend worker threads; 0 = all cores */
    int32_t tensor_parallel;     /* tp ranks; default 1 */
    int32_t expert_parallel;     /* ep ranks; default 1 */
    dbrx_progress_fn progress;   /* may be NULL */
    void *progress_user_data;
    /* Every sequence's logits bitwise independent of what else shares its steps (batch, chunking,
     * preemption, prefix cache). The CPU backend always is; CUDA then runs every GEMM as groups of
     * at most 8 tokens and every attention row through the split-K kernel: same decode speed at
     * small batches, much slower prefill. Default false. */
    bool batch_invariant;
    /* Multi-GPU (CUDA): tensor_parallel * expert_parallel ranks, one per GPU, over n_nodes processes
     * (one per host) driving n_devices GPUs each, so tp * ep = n_nodes * n_devices.
     * devices[0 .. n_devices-1]: this process's GPUs (CUDA ordinals, distinct), in rank order;
     * n_devices = 0 (default): tp * ep / n_nodes consecutive GPUs from device_id. */
    int32_t n_devices;
    int32_t devices[DBRX_MAX_DEVICES];
    /* Several processes: process 0's address "host:port" (it listens there, the others connect);
     * NULL or "" (default) = MASTER_ADDR and MASTER_PORT. Copied during dbrx_model_load. */
    const char *rendezvous;
    int32_t n_nodes;             /* processes; -1 (default) = the launcher's (WORLD_SIZE, SLURM_NTASKS,
                                    OMPI_COMM_WORLD_SIZE, PMI_SIZE), else 1 */
    int32_t node_rank;           /* this process's index in [0, n_nodes); -1 (default) = the launcher's
                                    (RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK), else 0 */
} dbrx_model_params;

typedef struct dbrx_model_info {
    int32_t n_vocab;
    int32_t n_ctx_max;           /* config max_seq_len */
    int32_t d_model;
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t n_experts;
    int32_t top_k;
    int32_t ffn_hidden;
    int32_t n_eos;               /* generation_config eos_token_id(s) */
    int32_t eos_ids[DBRX_MAX_STOP_IDS];
    int64_t weight_bytes;        /* bytes of weights as loaded on the device */
    dbrx_device device;
} dbrx_model_info;

DBRX_API dbrx_model_params dbrx_model_default_params(void);
/* dir: a Hugging Face DBRX checkpoint directory (config.json, generation_config.json,
 * model.safetensors or model.safetensors.index.json + shards). */
DBRX_API dbrx_status dbrx_model_load(const char *dir, const dbrx_model_params *params, dbrx_model **out);
/* Safe with NULL. The model must outlive every engine created from it. */
DBRX_API void dbrx_model_free(dbrx_model *model);
DBRX_API dbrx_status dbrx_model_get_info(const dbrx_model *model, dbrx_model_info *out);
/* Several processes (n_nodes > 1): process 0 creates the engine and serves requests; every other
 * process (node_rank > 0) calls dbrx_model_serve instead, which runs the KV pools and forward steps
 * process 0 sends (over a TCP channel opened on the rendezvous address during dbrx_model_load) on
 * this process's GPUs until process 0 frees its model. Returns DBRX_OK then; DBRX_ERR_ENGINE_DEAD,
 * naming the peer, when process 0 exits or its connection breaks or falls silent, or when a step
 * fails here (process 0's steps then fail with ENGINE_DEAD too). DBRX_ERR_INVALID_ARGUMENT on
 * process 0 or a single process, or when called a second time. Blocks the calling thread; do not
 * free the model meanwhile. On a model with node_rank > 0, dbrx_engine_create fails with
 * DBRX_ERR_INVALID_ARGUMENT. */
DBRX_API dbrx_status dbrx_model_serve(dbrx_model *model);

/* ---- engine ---- */

typedef struct dbrx_engine dbrx_engine;

typedef struct dbrx_engine_params {
    int32_t block_size;          /* tokens per KV block; default 16 */
    int32_t kv_blocks;           /* explicit pool size in blocks; 0 = from the two fields below */
    int64_t kv_cache_bytes;      /* pool size in bytes; 0 = use kv_cache_fraction */
    float kv_cache_fraction;     /* of free device memory (CUDA) or of 2 GiB (CPU); default 0.9 */
    int32_t max_batch_tokens;    /* tokens per step (decodes + prefill chunks); default 2048 */
    int32_t max_running;         /* sequences in the running batch; default 256 */
    int32_t max_waiting;         /* queued requests before submit fails with QUEUE_FULL; default 4096 */
    int32_t max_ctx;             /* per-request context limit; 0 = the model's max_seq_len */
    bool enable_prefix_cache;    /* default true */
} dbrx_engine_params;

typedef struct dbrx_sampling_params {
    float temperature;           /* 0 = greedy (default) */
    int32_t top_k;               /* 0 or -1 = off (default) */
    float top_p;                 /* (0, 1]; default 1 */
    float min_p;                 /* [0, 1]; default 0 */
    float repetition_penalty;    /* > 0; 1 = off (default) */
    float presence_penalty;      /* default 0 */
    float frequency_penalty;     /* default 0 */
    uint64_t seed;               /* used when has_seed */
    int32_t max_tokens;          /* >= 1; default 256 */
    int32_t top_logprobs;        /* 0..DBRX_MAX_TOP_LOGPROBS alternatives per token; default 0 */
    int32_t n_stop_ids;          /* -1 = the model's eos ids (default); 0..DBRX_MAX_STOP_IDS = stop_ids */
    int32_t stop_ids[DBRX_MAX_STOP_IDS];
    bool has_seed;               /* false: a seed is drawn from the engine's generator */
    bool logprobs;               /* report the sampled token's logprob */
    bool keep_prompt_logits;     /* keep the last prompt position's logits for
                                    dbrx_engine_get_prompt_logits (n_vocab floats per request) */
} dbrx_sampling_params;

typedef struct dbrx_engine_stats {
    int32_t running;             /* requests in the running batch */
    int32_t waiting;             /* requests queued (new or preempted) */
    int32_t blocks_total;
    int32_t blocks_used;         /* referenced by some request */
    int32_t blocks_free;         /* unreferenced and holding no cached prefix */
    int32_t blocks_cached;       /* unreferenced, holding a cached prefix (evictable) */
    int32_t block_size;
    int64_t kv_capacity_tokens;  /* blocks_total * block_size */
    int64_t prefix_query_tokens; /* prompt tokens looked up in the prefix cache */
    int64_t prefix_hit_tokens;   /* of which found cached (prefill skipped) */
    int64_t preemptions;
    int64_t steps;
    int64_t prompt_tokens;       /* prefilled tokens (excludes prefix hits) */
    int64_t generated_tokens;
    int64_t finished_requests;
    double tokens_per_second;    /* generated tokens per second, recent window */
} dbrx_engine_stats;

/* One generated token. */
typedef struct dbrx_token {
    int32_t id;
    float logprob;               /* when sampling.logprobs: log-softmax of the sampled token */
    int32_t n_top;               /* number of filled top_* entries */
    int32_t top_ids[DBRX_MAX_TOP_LOGPROBS];
    float top_logprobs[DBRX_MAX_TOP_LOGPROBS];
} dbrx_token;

DBRX_API dbrx_engine_params dbrx_engine_default_params(void);
DBRX_API dbrx_sampling_params dbrx_sampling_default_params(void);
DBRX_API dbrx_status dbrx_engine_create(dbrx_model *model, const dbrx_engine_params *params, dbrx_engine **out);
/* Stops the worker, cancels every request. Safe with NULL. */
DBRX_API void dbrx_engine_free(dbrx_engine *engine);

/* Queue a request; its id goes to *out_id. The prompt is copied. Fails without side effects
 * (INVALID_ARGUMENT, QUEUE_FULL, ENGINE_DEAD) and the message names the offending field. */
DBRX_API dbrx_status dbrx_engine_submit(dbrx_engine *engine, const int32_t *prompt, int32_t n_prompt,
                                        const dbrx_sampling_params *sampling, uint64_t *out_id);
/* Take up to cap tokens produced since the last poll into out[] (*n_out of them), waiting up to
 * timeout_ms (0 = do not wait, -1 = forever) for at least one token or the finish.
 * *finish is DBRX_FINISH_NONE while the request runs. Returns DBRX_ERR_TIMEOUT when the wait ended
 * with nothing new; for FINISH_ERROR the request's error text is in dbrx_last_error(). */
DBRX_API dbrx_status dbrx_engine_poll(dbrx_engine *engine, uint64_t id, int32_t timeout_ms,
                                      dbrx_token *out, int32_t cap, int32_t *n_out,
                                      dbrx_finish_reason *finish);
/* Logits [n_vocab] of the last prompt position (the distribution of the first generated token).
 * Needs sampling.keep_prompt_logits; available once the first token has been produced. */
DBRX_API dbrx_status dbrx_engine_get_prompt_logits(dbrx_engine *engine, uint64_t id, float *out, int32_t n_vocab);
/* Ask the request to stop; its KV blocks are freed at the next step. Idempotent. */
DBRX_API dbrx_status dbrx_engine_cancel(dbrx_engine *engine, uint64_t id);
/* Forget a request (cancelling it first if it still runs); its id becomes unknown. */
DBRX_API dbrx_status dbrx_engine_release(dbrx_engine *engine, uint64_t id);
DBRX_API dbrx_status dbrx_engine_get_stats(dbrx_engine *engine, dbrx_engine_stats *out);

/* ---- convenience ---- */

/* Run one request to completion on the engine: out_ids gets up to cap generated ids (*n_out),
 * last_logits (may be NULL) the prompt's last-position logits [n_vocab]. */
DBRX_API dbrx_status dbrx_generate(dbrx_engine *engine, const int32_t *prompt, int32_t n_prompt,
                                   const dbrx_sampling_params *sampling, int32_t *out_ids, int32_t cap,
                                   int32_t *n_out, float *last_logits, dbrx_finish_reason *finish);

#ifdef __cplusplus
}
#endif

#endif /* DBRX_H */
