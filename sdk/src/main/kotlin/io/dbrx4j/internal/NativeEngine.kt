package io.dbrx4j.internal

import io.dbrx4j.DbrxClosedException
import io.dbrx4j.Device
import io.dbrx4j.EngineStats
import io.dbrx4j.LoadOptions
import io.dbrx4j.ModelInfo
import io.dbrx4j.runtime.dbrx_engine
import io.dbrx4j.runtime.dbrx_engine_stats
import io.dbrx4j.runtime.dbrx_model
import io.dbrx4j.runtime.dbrx_model_info
import io.dbrx4j.runtime.dbrx_progress_fn
import io.dbrx4j.runtime.dbrx_sampling_params
import io.dbrx4j.runtime.dbrx_token
import io.dbrx4j.runtime.global.dbrx
import org.bytedeco.javacpp.BytePointer
import org.bytedeco.javacpp.Pointer
import java.nio.file.Path
import java.util.concurrent.atomic.AtomicBoolean
import java.util.concurrent.locks.ReentrantReadWriteLock
import kotlin.concurrent.read
import kotlin.concurrent.write

/** What one dbrx_engine_poll returned. */
internal class PollResult(val tokens: List<NativeToken>, val finish: Int, val error: String?)

internal class NativeToken(val id: Int, val logprob: Float, val topIds: IntArray, val topLogprobs: FloatArray)

/**
 * The native model and engine pair. Thread-safe: every call holds the read lock and checks [closed];
 * [close] takes the write lock, so the handles are never freed under a running call, and a call after
 * close throws [DbrxClosedException] instead of touching freed memory.
 */
internal class NativeEngine private constructor(
    private val model: dbrx_model,
    private val engine: dbrx_engine,
    val info: ModelInfo,
) : AutoCloseable {
    private val lock = ReentrantReadWriteLock()
    private val closing = AtomicBoolean(false)
    @Volatile private var closed = false

    val isClosed: Boolean get() = closed || closing.get()

    private inline fun <T> call(block: () -> T): T = lock.read {
        if (closed) throw DbrxClosedException("the model was closed")
        block()
    }

    fun submit(prompt: IntArray, sampling: dbrx_sampling_params): Long = call {
        val id = LongArray(1)
        Native.check(dbrx.dbrx_engine_submit(engine, prompt, prompt.size, sampling, id), "dbrx_engine_submit")
        id[0]
    }

    /** Waits up to [timeoutMs] for tokens of request [id]; [buffer] holds [cap] dbrx_token slots. */
    fun poll(id: Long, timeoutMs: Int, buffer: dbrx_token, cap: Int): PollResult = call {
        val n = IntArray(1)
        val finish = IntArray(1)
        val status = dbrx.dbrx_engine_poll(engine, id, timeoutMs, buffer, cap, n, finish)
        if (status == dbrx.DBRX_ERR_TIMEOUT) return@call PollResult(emptyList(), dbrx.DBRX_FINISH_NONE, null)
        Native.check(status, "dbrx_engine_poll")
        val tokens = (0 until n[0]).map { i ->
            val t = buffer.getPointer(i.toLong())
            val top = t.n_top()
            NativeToken(t.id(), t.logprob(), IntArray(top) { t.top_ids(it) }, FloatArray(top) { t.top_logprobs(it) })
        }
        val error = if (finish[0] == dbrx.DBRX_FINISH_ERROR) Native.lastError() else null
        PollResult(tokens, finish[0], error)
    }

    /**
     * The last prompt position's logits of request [id]: it must have been submitted with
     * keep_prompt_logits and have produced a token, and not be released yet.
     */
    fun promptLogits(id: Long): FloatArray = call {
        val out = FloatArray(info.vocabSize)
        Native.check(dbrx.dbrx_engine_get_prompt_logits(engine, id, out, out.size), "dbrx_engine_get_prompt_logits")
        out
    }

    /** Idempotent; a request that already finished or was released, or a closed engine, is not an error. */
    fun cancel(id: Long) {
        lock.read { if (!closed) dbrx.dbrx_engine_cancel(engine, id) }
    }

    /** Forgets the request; a no-op once the engine is closed (freeing it forgot every request). */
    fun release(id: Long) {
        lock.read { if (!closed) dbrx.dbrx_engine_release(engine, id) }
    }

    fun stats(): EngineStats = call {
        dbrx_engine_stats().use { s ->
            Native.check(dbrx.dbrx_engine_get_stats(engine, s), "dbrx_engine_get_stats")
            EngineStats(
                s.running(), s.waiting(), s.blocks_total(), s.blocks_used(), s.blocks_free(), s.blocks_cached(),
                s.block_size(), s.kv_capacity_tokens(), s.prefix_query_tokens(), s.prefix_hit_tokens(),
                s.preemptions(), s.steps(), s.prompt_tokens(), s.generated_tokens(), s.finished_requests(),
                s.tokens_per_second(),
            )
        }
    }

    /** Idempotent and safe from any thread: the first call frees the engine, then the model. */
    override fun close() {
        if (!closing.compareAndSet(false, true)) return
        lock.write {
            closed = true
            dbrx.dbrx_engine_free(engine)
            dbrx.dbrx_model_free(model)
        }
    }

    companion object {
        fun open(dir: Path, options: LoadOptions): NativeEngine {
            Native.ensureLoaded()
            val model = loadModel(dir, options)
            try {
                val info = modelInfo(model)
                val engine = dbrx_engine()
                dbrx.dbrx_engine_default_params().use { ep ->
                    options.blockSize?.let { ep.block_size(it) }
                    ep.kv_blocks(options.kvBlocks)
                    ep.kv_cache_bytes(options.kvCacheBytes)
                    options.kvCacheFraction?.let { ep.kv_cache_fraction(it) }
                    options.maxBatchTokens?.let { ep.max_batch_tokens(it) }
                    options.maxRunning?.let { ep.max_running(it) }
                    options.maxWaiting?.let { ep.max_waiting(it) }
                    ep.max_ctx(options.maxContext)
                    ep.enable_prefix_cache(options.prefixCache)
                    Native.check(dbrx.dbrx_engine_create(model, ep, engine), "dbrx_engine_create")
                }
                return NativeEngine(model, engine, info)
            } catch (t: Throwable) {
                dbrx.dbrx_model_free(model)
                throw t
            }
        }

        /**
         * A follower process of a multi-process model (node_rank > 0): loads this process's shards, then
         * runs process 0's steps until process 0 frees its model (dbrx_model_serve).
         */
        fun serve(dir: Path, options: LoadOptions) {
            Native.ensureLoaded()
            val model = loadModel(dir, options)
            try {
                Native.check(dbrx.dbrx_model_serve(model), "dbrx_model_serve")
            } finally {
                dbrx.dbrx_model_free(model)
            }
        }

        private fun loadModel(dir: Path, options: LoadOptions): dbrx_model {
            val callback = options.progress?.let { ProgressCallback(it) }
            try {
                dbrx.dbrx_model_default_params().use { mp ->
                    mp.device(if (options.device == Device.CUDA) dbrx.DBRX_DEVICE_CUDA else dbrx.DBRX_DEVICE_CPU)
                    mp.device_id(options.deviceId)
                    mp.n_threads(options.threads)
                    mp.tensor_parallel(options.tensorParallel)
                    mp.expert_parallel(options.expertParallel)
                    mp.batch_invariant(options.batchInvariant)
                    // Past DBRX_MAX_DEVICES only the count is passed: the native loader names the limit.
                    mp.n_devices(options.devices.size)
                    options.devices.take(dbrx.DBRX_MAX_DEVICES).forEachIndexed { i, d -> mp.devices(i, d) }
                    mp.n_nodes(options.nodes ?: -1)
                    mp.node_rank(options.nodeRank ?: -1)
                    if (callback != null) mp.progress(callback)
                    val model = dbrx_model()
                    // Kept alive until dbrx_model_load returns (it copies the address).
                    val rendezvous = options.rendezvous?.let { BytePointer(it) }
                    val status = try {
                        if (rendezvous != null) mp.rendezvous(rendezvous)
                        dbrx.dbrx_model_load(dir.toString(), mp, model)
                    } finally {
                        rendezvous?.close()
                    }
                    callback?.error?.let { throw it }
                    Native.check(status, "loading $dir")
                    return model
                }
            } finally {
                callback?.close()
            }
        }

        private fun modelInfo(model: dbrx_model): ModelInfo = dbrx_model_info().use { i ->
            Native.check(dbrx.dbrx_model_get_info(model, i), "dbrx_model_get_info")
            ModelInfo(
                i.n_vocab(), i.n_ctx_max(), i.d_model(), i.n_layers(), i.n_heads(), i.n_kv_heads(), i.head_dim(),
                i.n_experts(), i.top_k(), i.ffn_hidden(), (0 until i.n_eos()).map { i.eos_ids(it) }, i.weight_bytes(),
                if (i.device() == dbrx.DBRX_DEVICE_CUDA) Device.CUDA else Device.CPU,
            )
        }
    }

    /** Bridges dbrx_progress_fn to the listener; a listener exception aborts the load and is rethrown. */
    private class ProgressCallback(private val listener: io.dbrx4j.LoadProgressListener) : dbrx_progress_fn() {
        var error: Throwable? = null
        override fun call(progress: Float, userData: Pointer?): Boolean = try {
            listener.onProgress(progress)
            true
        } catch (t: Throwable) {
            error = t
            false
        }
    }
}
