package io.dbrx4j

import java.time.Duration

/** Where the weights live and the forward pass runs. */
enum class Device { CPU, CUDA }

/** Load progress in [0, 1], reported on the loading thread. Throwing aborts the load. */
fun interface LoadProgressListener {
    fun onProgress(fraction: Float)
}

/**
 * How to load a checkpoint and size its engine. Immutable; build with [builder]. Unset numeric fields
 * keep the native defaults (dbrx_model_default_params / dbrx_engine_default_params).
 */
class LoadOptions private constructor(b: Builder) {
    val device: Device = b.device
    val deviceId: Int = b.deviceId
    val threads: Int = b.threads
    val tensorParallel: Int = b.tensorParallel
    val expertParallel: Int = b.expertParallel
    /** This process's GPUs, one rank each, in rank order; empty = consecutive GPUs from [deviceId]. */
    val devices: List<Int> = b.devices
    /** Process 0's "host:port" for several processes; null = MASTER_ADDR / MASTER_PORT. */
    val rendezvous: String? = b.rendezvous
    /** Processes (one per host); null = the launcher's (WORLD_SIZE, SLURM_NTASKS, ...), else 1. */
    val nodes: Int? = b.nodes
    /** This process's index; null = the launcher's (RANK, SLURM_PROCID, ...), else 0. */
    val nodeRank: Int? = b.nodeRank
    val kvCacheBytes: Long = b.kvCacheBytes
    val kvCacheFraction: Float? = b.kvCacheFraction
    val kvBlocks: Int = b.kvBlocks
    val blockSize: Int? = b.blockSize
    val maxBatchTokens: Int? = b.maxBatchTokens
    val maxRunning: Int? = b.maxRunning
    val maxWaiting: Int? = b.maxWaiting
    val maxContext: Int = b.maxContext
    val prefixCache: Boolean = b.prefixCache
    val batchInvariant: Boolean = b.batchInvariant
    val progress: LoadProgressListener? = b.progress
    val templateTimeout: Duration = b.templateTimeout

    fun toBuilder(): Builder = Builder(this)

    class Builder internal constructor(from: LoadOptions?) {
        internal var device = from?.device ?: Device.CPU
        internal var deviceId = from?.deviceId ?: 0
        internal var threads = from?.threads ?: 0
        internal var tensorParallel = from?.tensorParallel ?: 1
        internal var expertParallel = from?.expertParallel ?: 1
        internal var devices: List<Int> = from?.devices ?: emptyList()
        internal var rendezvous: String? = from?.rendezvous
        internal var nodes: Int? = from?.nodes
        internal var nodeRank: Int? = from?.nodeRank
        internal var kvCacheBytes = from?.kvCacheBytes ?: 0L
        internal var kvCacheFraction: Float? = from?.kvCacheFraction
        internal var kvBlocks = from?.kvBlocks ?: 0
        internal var blockSize: Int? = from?.blockSize
        internal var maxBatchTokens: Int? = from?.maxBatchTokens
        internal var maxRunning: Int? = from?.maxRunning
        internal var maxWaiting: Int? = from?.maxWaiting
        internal var maxContext = from?.maxContext ?: 0
        internal var prefixCache = from?.prefixCache ?: true
        internal var batchInvariant = from?.batchInvariant ?: false
        internal var progress: LoadProgressListener? = from?.progress
        internal var templateTimeout: Duration = from?.templateTimeout ?: Duration.ofSeconds(2)

        fun device(device: Device) = apply { this.device = device }
        /** First CUDA device of the model. */
        fun deviceId(id: Int) = apply { deviceId = id }
        /** CPU backend worker threads; 0 = all cores. */
        fun threads(n: Int) = apply { threads = n }
        fun tensorParallel(ranks: Int) = apply { tensorParallel = ranks }
        fun expertParallel(ranks: Int) = apply { expertParallel = ranks }
        /**
         * Multi-GPU (CUDA): this process's GPUs, one tensor/expert-parallel rank each, in rank order;
         * tensorParallel * expertParallel must equal nodes * devices. Empty (default) = consecutive GPUs
         * from [deviceId]. The native loader checks them (distinct, non-negative, at most 16).
         */
        fun devices(ids: List<Int>) = apply { devices = ids.toList() }
        fun devices(vararg ids: Int) = apply { devices = ids.toList() }
        /** Several processes (one per host): process 0's address, "host:port" ("[::1]:port" for IPv6). */
        fun rendezvous(address: String?) = apply { rendezvous = address }
        /** Number of processes; null (default) = from the launcher's environment, else 1. */
        fun nodes(count: Int?) = apply { nodes = count }
        /** This process's index in [0, nodes); null (default) = from the launcher's environment, else 0. */
        fun nodeRank(rank: Int?) = apply { nodeRank = rank }
        /** KV-cache pool size in bytes (0 = from [kvCacheFraction]). */
        fun kvCacheBytes(bytes: Long) = apply { kvCacheBytes = bytes }
        /** Share of free device memory (CUDA) or of 2 GiB (CPU) for the KV cache. */
        fun kvCacheFraction(fraction: Float) = apply { kvCacheFraction = fraction }
        /** Explicit KV pool size in blocks (overrides bytes and fraction). */
        fun kvBlocks(blocks: Int) = apply { kvBlocks = blocks }
        fun blockSize(tokens: Int) = apply { blockSize = tokens }
        /** Tokens per engine step (decodes plus prefill chunks). */
        fun maxBatchTokens(tokens: Int) = apply { maxBatchTokens = tokens }
        fun maxRunning(sequences: Int) = apply { maxRunning = sequences }
        fun maxWaiting(requests: Int) = apply { maxWaiting = requests }
        /** Per-request context limit; 0 = the model's max_seq_len. */
        fun maxContext(tokens: Int) = apply { maxContext = tokens }
        fun prefixCache(enabled: Boolean) = apply { prefixCache = enabled }
        /**
         * Each request's output bitwise independent of what else is batched with it (dbrx_model_params
         * batch_invariant). Free on the CPU; on CUDA it costs prefill speed. Not with tp/ep on CUDA.
         */
        fun batchInvariant(enabled: Boolean) = apply { batchInvariant = enabled }
        fun onProgress(listener: LoadProgressListener?) = apply { progress = listener }
        /** Upper bound on one chat-template render. */
        fun templateTimeout(timeout: Duration) = apply { templateTimeout = timeout }
        fun build() = LoadOptions(this)
    }

    companion object {
        @JvmStatic fun builder() = Builder(null)
        @JvmField val DEFAULTS: LoadOptions = builder().build()
    }
}
