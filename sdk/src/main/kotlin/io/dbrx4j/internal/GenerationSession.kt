package io.dbrx4j.internal

import io.dbrx4j.DbrxEngineException
import io.dbrx4j.DbrxInvalidArgumentException
import io.dbrx4j.FinishReason
import io.dbrx4j.SamplingOptions
import io.dbrx4j.Token
import io.dbrx4j.Tokenizer
import io.dbrx4j.runtime.dbrx_token
import io.dbrx4j.runtime.global.dbrx
import java.util.ArrayDeque
import java.util.concurrent.atomic.AtomicBoolean
import java.util.concurrent.locks.ReentrantLock
import kotlin.concurrent.withLock

/**
 * One native request, from submit to release: the blocking core that the Flow, TokenStream and
 * CompletableFuture shapes all drive. [next] is called by one consumer at a time; [close] may come from
 * any thread at any moment and cancels the native request at once (its KV blocks go back at the next
 * engine step), then releases it.
 */
internal class GenerationSession(
    private val engine: NativeEngine,
    tokenizer: Tokenizer?,
    val promptTokens: Int,
    prompt: IntArray,
    options: SamplingOptions,
    stopIds: IntArray,
) : AutoCloseable {
    private val lock = ReentrantLock()
    private val closing = AtomicBoolean(false)
    private val assembler = TokenAssembler(tokenizer, options.stopStrings)
    private val ready = ArrayDeque<Token>()
    private val buffer = dbrx_token(POLL_CAP.toLong())
    private val keepPromptLogits = options.promptLogits
    private val id: Long
    private var released = false

    /** Set once the request has ended; tokens may still wait in the queue. */
    @Volatile var finishReason: FinishReason? = null
        private set

    val isFinished: Boolean get() = finishReason != null && lock.withLock { ready.isEmpty() }

    /**
     * The last prompt position's logits when [SamplingOptions.promptLogits] asked for them: read from the
     * engine with the first token, since the native request (and its copy) is gone once released.
     */
    @Volatile var promptLogits: FloatArray? = null
        private set

    init {
        try {
            id = submit(prompt, options, stopIds)
        } catch (t: Throwable) {
            buffer.close()
            throw t
        }
    }

    private fun submit(prompt: IntArray, o: SamplingOptions, stopIds: IntArray): Long {
        if (stopIds.size > dbrx.DBRX_MAX_STOP_IDS) {
            throw DbrxInvalidArgumentException("at most ${dbrx.DBRX_MAX_STOP_IDS} stop token ids, got ${stopIds.size}")
        }
        return dbrx.dbrx_sampling_default_params().use { p ->
            p.temperature(o.temperature).top_k(o.topK).top_p(o.topP).min_p(o.minP)
            p.repetition_penalty(o.repetitionPenalty).presence_penalty(o.presencePenalty)
            p.frequency_penalty(o.frequencyPenalty).max_tokens(o.maxTokens)
            p.logprobs(o.logprobs).top_logprobs(o.topLogprobs).keep_prompt_logits(o.promptLogits)
            o.seed?.let { p.has_seed(true).seed(it) }
            p.n_stop_ids(stopIds.size)
            stopIds.forEachIndexed { i, s -> p.stop_ids(i, s) }
            engine.submit(prompt, p)
        }
    }

    /** The next token, waiting at most [timeoutMs]; null when none came (see [isFinished]). */
    fun next(timeoutMs: Int): Token? = lock.withLock {
        ready.pollFirst()?.let { return it }
        if (finishReason != null) return null
        if (closing.get()) {
            end(FinishReason.CANCELLED)
            return ready.pollFirst()
        }
        val result = engine.poll(id, timeoutMs, buffer, POLL_CAP)
        if (keepPromptLogits && promptLogits == null && result.tokens.isNotEmpty()) promptLogits = engine.promptLogits(id)
        for (t in result.tokens) {
            if (assembler.stopped) break
            ready.addAll(assembler.accept(t))
        }
        when {
            assembler.stopped -> end(FinishReason.STOP)
            result.finish == dbrx.DBRX_FINISH_STOP -> end(FinishReason.STOP)
            result.finish == dbrx.DBRX_FINISH_LENGTH -> end(FinishReason.LENGTH)
            result.finish == dbrx.DBRX_FINISH_CANCELLED -> end(FinishReason.CANCELLED)
            result.finish == dbrx.DBRX_FINISH_ERROR -> {
                releaseNative()
                throw DbrxEngineException("REQUEST_FAILED", "generation failed: ${result.error}")
            }
        }
        ready.pollFirst()
    }

    private fun end(reason: FinishReason) {
        ready.addAll(assembler.finish())
        finishReason = reason
        releaseNative()
    }

    /** Cancels and forgets the native request (under [lock]). */
    private fun releaseNative() {
        if (released) return
        released = true
        engine.release(id)
    }

    /** Idempotent, from any thread: cancels at once, releases as soon as no poll is running. */
    override fun close() {
        if (!closing.compareAndSet(false, true)) return
        if (finishReason == null) engine.cancel(id)
        lock.withLock {
            if (finishReason == null) finishReason = FinishReason.CANCELLED
            releaseNative()
            buffer.close()
        }
    }

    companion object {
        /** Tokens taken per poll. */
        const val POLL_CAP = 16
        /** Longest blocking wait in one poll: bounds how late a cancellation is noticed. */
        const val POLL_MS = 50
    }
}
