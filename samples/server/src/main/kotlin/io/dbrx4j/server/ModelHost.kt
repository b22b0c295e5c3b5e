package io.dbrx4j.server

import io.dbrx4j.DbrxClosedException
import io.dbrx4j.DbrxEngineException
import io.dbrx4j.DbrxException
import io.dbrx4j.DbrxInvalidArgumentException
import io.dbrx4j.DbrxModel
import io.dbrx4j.DbrxOutOfMemoryException
import io.dbrx4j.DbrxTemplateException
import io.dbrx4j.EngineStats
import org.slf4j.LoggerFactory
import java.util.concurrent.atomic.AtomicInteger

/**
 * The model's life as the server sees it: loading (in the background, so /health answers 503 at
 * once), ready, or dead (the load failed, or the engine reported itself dead or was closed). Turns SDK
 * exceptions into HTTP errors.
 */
class ModelHost(private val loader: () -> DbrxModel) : AutoCloseable {
    private val log = LoggerFactory.getLogger(ModelHost::class.java)

    @Volatile var model: DbrxModel? = null
        private set
    @Volatile private var deadReason: String? = null
    @Volatile private var loading = true

    fun start(): Thread = Thread({
        try {
            val m = loader()
            model = m
            log.info("model ready: {}", m.info)
        } catch (t: Throwable) {
            deadReason = "the model failed to load: ${t.message}"
            log.error("model load failed", t)
        } finally {
            loading = false
        }
    }, "dbrx4j-model-loader").apply { isDaemon = true; start() }

    enum class State { LOADING, READY, DEAD }

    val state: State get() = when {
        loading -> State.LOADING
        deadReason != null -> State.DEAD
        model?.isClosed != false -> State.DEAD
        else -> State.READY
    }

    val reason: String get() = when (state) {
        State.LOADING -> "the model is still loading"
        State.DEAD -> "the engine is not available: ${deadReason ?: "the model was closed"}"
        State.READY -> "ready"
    }

    /** The model, or a 503 naming why it cannot serve. */
    fun require(): DbrxModel {
        val m = model
        if (state != State.READY || m == null) {
            throw ApiError(503, reason, code = if (loading) "model_loading" else "engine_dead")
        }
        return m
    }

    fun stats(): EngineStats? = try {
        model?.takeUnless { it.isClosed }?.stats()
    } catch (e: DbrxException) {
        null
    }

    fun markDead(why: String) {
        if (deadReason == null) {
            deadReason = why
            log.error("engine marked dead: {}", why)
        }
    }

    /** The HTTP answer for an SDK failure; engine death also flips the server to 503. */
    fun toApiError(t: Throwable): ApiError = when (t) {
        is ApiError -> t
        is DbrxTemplateException -> ApiError(400, t.message ?: "chat template failed", code = "chat_template_error")
        is DbrxInvalidArgumentException -> ApiError(400, t.message ?: "invalid argument", code = "invalid_value")
        is DbrxClosedException -> {
            markDead(t.message ?: "closed")
            ApiError(503, "the engine is not available: ${t.message}", code = "engine_dead")
        }
        is DbrxEngineException -> when (t.status) {
            "QUEUE_FULL" -> ApiError(429, "the engine's queue is full: ${t.message}", code = "queue_full")
            "ENGINE_DEAD" -> {
                markDead(t.message ?: "engine dead")
                ApiError(503, "the engine is not available: ${t.message}", code = "engine_dead")
            }
            else -> ApiError(500, t.message ?: t.status, code = t.status.lowercase())
        }
        is DbrxOutOfMemoryException -> ApiError(503, t.message ?: "out of memory", code = "out_of_memory")
        is DbrxException -> ApiError(500, t.message ?: t.status, code = t.status.lowercase())
        else -> ApiError(500, "internal error: ${t.javaClass.simpleName}: ${t.message}", code = "internal_error")
    }

    override fun close() {
        model?.close()
    }
}

/**
 * Bounds the HTTP generation requests: [maxConcurrent] hold a slot at once, [maxQueue] more wait for
 * one, and any beyond that are refused with 429 at once.
 */
class Admission(private val maxConcurrent: Int, private val maxQueue: Int) {
    private val slots = kotlinx.coroutines.sync.Semaphore(maxConcurrent)
    private val waitingCount = AtomicInteger()
    private val runningCount = AtomicInteger()

    val running: Int get() = runningCount.get()
    val waiting: Int get() = waitingCount.get()

    suspend fun <T> withSlot(block: suspend () -> T): T {
        if (!slots.tryAcquire()) {
            if (waitingCount.incrementAndGet() > maxQueue) {
                waitingCount.decrementAndGet()
                throw ApiError(
                    429, "too many requests: $maxConcurrent are running and $maxQueue are queued (the server's limits)",
                    code = "queue_full",
                )
            }
            try {
                slots.acquire()
            } finally {
                waitingCount.decrementAndGet()
            }
        }
        runningCount.incrementAndGet()
        try {
            return block()
        } finally {
            runningCount.decrementAndGet()
            slots.release()
        }
    }
}
