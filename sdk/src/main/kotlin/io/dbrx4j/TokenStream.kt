package io.dbrx4j

import io.dbrx4j.internal.GenerationSession
import java.util.Spliterator
import java.util.Spliterators
import java.util.stream.Stream
import java.util.stream.StreamSupport

/**
 * The blocking Java shape of a generation: an [Iterator] of [Token]s that is [AutoCloseable].
 * Use it in try-with-resources; closing it early (from any thread) cancels the native request and
 * returns its KV blocks, after which [hasNext] is false. Not for concurrent iteration from several threads.
 */
class TokenStream internal constructor(private val session: GenerationSession) : Iterator<Token>, AutoCloseable {
    private var lookahead: Token? = null

    /** Blocks until a token arrives or the generation ends. */
    override fun hasNext(): Boolean {
        if (lookahead != null) return true
        while (true) {
            val t = session.next(GenerationSession.POLL_MS)
            if (t != null) {
                lookahead = t
                return true
            }
            if (session.isFinished) return false
        }
    }

    override fun next(): Token {
        if (!hasNext()) throw NoSuchElementException("the generation has ended")
        return lookahead!!.also { lookahead = null }
    }

    /** A sequential [Stream] view; closing the Stream closes this TokenStream. */
    fun stream(): Stream<Token> =
        StreamSupport.stream(Spliterators.spliteratorUnknownSize(this, Spliterator.ORDERED or Spliterator.NONNULL), false)
            .onClose(this::close)

    /** Why the generation ended; null while it runs. */
    fun finishReason(): FinishReason? = session.finishReason

    /** Number of prompt tokens submitted. */
    fun promptTokens(): Int = session.promptTokens

    /**
     * The last prompt position's logits (a fresh copy) once the first token has arrived, when
     * [SamplingOptions.promptLogits] asked for them; null before that or otherwise.
     */
    fun promptLogits(): FloatArray? = session.promptLogits?.copyOf()

    /** Reads the rest of the stream into a [Completion] (together with [consumed] tokens already taken). */
    internal fun drain(consumed: List<Token> = emptyList()): Completion {
        val tokens = ArrayList(consumed)
        while (hasNext()) tokens.add(next())
        return Completion(
            tokens.joinToString("") { it.text }, tokens, session.finishReason ?: FinishReason.CANCELLED, promptTokens(),
            session.promptLogits,
        )
    }

    /** Idempotent and thread-safe: cancels the request if it still runs. */
    override fun close() = session.close()
}
