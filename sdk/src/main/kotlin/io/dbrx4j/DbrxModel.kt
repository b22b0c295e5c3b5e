package io.dbrx4j

import io.dbrx4j.internal.GenerationSession
import io.dbrx4j.internal.NativeEngine
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.cancel
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.future.future
import java.nio.file.Path
import java.util.concurrent.CompletableFuture
import java.util.concurrent.atomic.AtomicBoolean

/**
 * A loaded checkpoint with its engine: one per process, shared by every thread and coroutine (like
 * OkHttpClient). Each generation is one native request; the engine batches concurrent requests.
 *
 * Three shapes of the same stream, all cancelling the native request when abandoned:
 * [generate] (Kotlin, cold [Flow]), [stream] (Java, [TokenStream]), [completeAsync] ([CompletableFuture]);
 * plus the blocking [complete]. [close] is idempotent and safe from any thread; afterwards every call
 * throws [DbrxClosedException].
 */
class DbrxModel internal constructor(
    /** The checkpoint directory. */
    val path: Path,
    private val engine: NativeEngine,
    /** null when the checkpoint has no tokenizer.json (then only [Prompt.ids] prompts work). */
    val tokenizer: Tokenizer?,
    val chatTemplate: ChatTemplate,
) : AutoCloseable {
    private val scope = CoroutineScope(SupervisorJob() + Dispatchers.IO)
    private val closing = AtomicBoolean(false)

    val info: ModelInfo get() = engine.info

    /** Stop tokens used unless [SamplingOptions.stopTokenIds] says otherwise: eos ids and `<|im_end|>`. */
    val defaultStopTokenIds: List<Int> =
        (engine.info.eosIds + listOfNotNull(tokenizer?.tokenId("<|im_end|>"))).distinct()

    /** The token ids a prompt is submitted as. */
    fun promptIds(prompt: Prompt): IntArray {
        prompt.ids?.let { return it.copyOf() }
        val tok = tokenizer
            ?: throw DbrxInvalidArgumentException("$path has no tokenizer.json: only Prompt.ids prompts can run")
        return tok.encode(prompt.text ?: chatTemplate.render(prompt.messages!!, true))
    }

    /** Cold: each collection submits one request; cancelling the collector cancels it. */
    @JvmOverloads
    fun generate(prompt: Prompt, options: SamplingOptions = SamplingOptions.DEFAULTS): Flow<Token> = flow {
        val session = open(prompt, options)
        try {
            while (true) {
                val t = session.next(GenerationSession.POLL_MS)
                if (t != null) emit(t) else if (session.isFinished) break
                currentCoroutineContext().ensureActive()
            }
        } finally {
            session.close()
        }
    }.flowOn(Dispatchers.IO)

    @JvmOverloads
    fun generate(text: String, options: SamplingOptions = SamplingOptions.DEFAULTS): Flow<Token> =
        generate(Prompt.text(text), options)

    @JvmOverloads
    fun chat(messages: List<ChatMessage>, options: SamplingOptions = SamplingOptions.DEFAULTS): Flow<Token> =
        generate(Prompt.chat(messages), options)

    /** Submits now; iterate, and close (try-with-resources) to cancel early. */
    @JvmOverloads
    fun stream(prompt: Prompt, options: SamplingOptions = SamplingOptions.DEFAULTS): TokenStream =
        TokenStream(open(prompt, options))

    @JvmOverloads
    fun stream(text: String, options: SamplingOptions = SamplingOptions.DEFAULTS): TokenStream =
        stream(Prompt.text(text), options)

    /** Runs the whole generation on a background thread; cancel(true or false) cancels the native request. */
    @JvmOverloads
    fun completeAsync(prompt: Prompt, options: SamplingOptions = SamplingOptions.DEFAULTS): CompletableFuture<Completion> =
        scope.future {
            val session = open(prompt, options)
            try {
                val tokens = ArrayList<Token>()
                while (true) {
                    currentCoroutineContext().ensureActive()
                    val t = session.next(GenerationSession.POLL_MS)
                    if (t != null) tokens.add(t) else if (session.isFinished) break
                }
                Completion(
                    tokens.joinToString("") { it.text }, tokens, session.finishReason!!, session.promptTokens,
                    session.promptLogits,
                )
            } finally {
                session.close()
            }
        }

    /** Blocking: the whole generation on the calling thread. */
    @JvmOverloads
    fun complete(prompt: Prompt, options: SamplingOptions = SamplingOptions.DEFAULTS): Completion =
        stream(prompt, options).use { it.drain() }

    @JvmOverloads
    fun complete(text: String, options: SamplingOptions = SamplingOptions.DEFAULTS): Completion =
        complete(Prompt.text(text), options)

    fun stats(): EngineStats = engine.stats()

    val isClosed: Boolean get() = closing.get() || engine.isClosed

    /** Cancels every generation in flight, then frees the engine and the weights. */
    override fun close() {
        if (!closing.compareAndSet(false, true)) return
        scope.cancel()
        engine.close()
        tokenizer?.close()
    }

    private fun open(prompt: Prompt, options: SamplingOptions): GenerationSession {
        if (engine.isClosed) throw DbrxClosedException("the model was closed")
        val ids = promptIds(prompt)
        val stopIds = (options.stopTokenIds ?: defaultStopTokenIds).toIntArray()
        return GenerationSession(engine, tokenizer, ids.size, ids, options, stopIds)
    }
}
