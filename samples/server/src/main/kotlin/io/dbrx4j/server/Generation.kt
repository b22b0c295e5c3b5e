package io.dbrx4j.server

import io.dbrx4j.DbrxModel
import io.dbrx4j.FinishReason
import io.dbrx4j.Prompt
import io.dbrx4j.SamplingOptions
import io.dbrx4j.Token
import io.dbrx4j.TokenStream
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.launch

/** One choice to generate: [index] in the response, the prompt's ids and the options with its seed. */
class ChoiceJob(val index: Int, val promptIndex: Int, val ids: IntArray, val options: SamplingOptions)

sealed class ChoiceEvent(val index: Int) {
    class Tok(index: Int, val token: Token, val nanos: Long) : ChoiceEvent(index)
    class End(index: Int, val reason: FinishReason) : ChoiceEvent(index)
    class Fail(index: Int, val error: Throwable) : ChoiceEvent(index)
}

object Planner {
    /**
     * Tokenizes (rendering chat messages with the checkpoint's template) and checks every prompt against
     * the context: prompt + max_tokens must fit, and a 400 names the limit when it does not.
     */
    fun plan(model: DbrxModel, encoder: PromptEncoder, req: GenerationRequest, config: ServerConfig): List<ChoiceJob> {
        val ctx = if (config.maxContext > 0) minOf(config.maxContext, model.info.maxContext) else model.info.maxContext
        val vocab = model.info.vocabSize
        val jobs = ArrayList<ChoiceJob>()
        req.prompts.forEachIndexed { p, prompt ->
            val ids = encoder.ids(model, prompt)
            val param = if (req.endpoint == Endpoint.CHAT) "messages" else "prompt"
            if (ids.isEmpty()) throw ApiError.invalid(param, "the $param is empty (0 tokens)")
            ids.firstOrNull { it >= vocab }?.let { throw ApiError.invalid(param, "token id $it is outside the vocabulary (size $vocab)") }
            val maxTokens = req.maxTokens ?: minOf(config.maxTokens, ctx - ids.size)
            if (ids.size + maxTokens > ctx) {
                val which = if (req.endpoint == Endpoint.CHAT) "max_completion_tokens" else "max_tokens"
                val message = if (req.maxTokens == null) {
                    "this model's maximum context length is $ctx tokens, and the $param has ${ids.size} tokens, leaving no room to generate"
                } else {
                    "this model's maximum context length is $ctx tokens; the $param has ${ids.size} tokens and $which is " +
                        "$maxTokens (${ids.size + maxTokens} in all). Shorten the $param or lower $which."
                }
                throw ApiError(400, message, param = if (req.maxTokens == null) param else which, code = "context_length_exceeded")
            }
            for (i in 0 until req.n) {
                val index = p * req.n + i
                val b = req.sampling.toBuilder().maxTokens(maxTokens)
                // Each choice its own stream of the seed, so n > 1 gives different choices, reproducibly.
                req.seed?.let { b.seed(it + index) }
                jobs.add(ChoiceJob(index, p, ids, b.build()))
            }
        }
        return jobs
    }
}

/**
 * The running choices of one HTTP request. Submits every choice at construction (so engine refusals
 * surface before any response byte); [start] pumps each [TokenStream] on a blocking-friendly dispatcher
 * into [events], a bounded channel, so a slow reader only parks its own pumps while the engine keeps
 * buffering. [close] cancels every native request still running (freeing its KV blocks); idempotent.
 */
class Generation(model: DbrxModel, val jobs: List<ChoiceJob>) : AutoCloseable {
    private val streams: List<TokenStream>
    val events = Channel<ChoiceEvent>(EVENT_BUFFER)

    init {
        val opened = ArrayList<TokenStream>(jobs.size)
        try {
            for (j in jobs) opened.add(model.stream(Prompt.ids(j.ids), j.options))
        } catch (t: Throwable) {
            opened.forEach { it.close() }
            throw t
        }
        streams = opened
    }

    fun start(scope: CoroutineScope) {
        streams.forEachIndexed { i, ts ->
            val index = jobs[i].index
            scope.launch {
                try {
                    while (ts.hasNext()) events.send(ChoiceEvent.Tok(index, ts.next(), System.nanoTime()))
                    events.send(ChoiceEvent.End(index, ts.finishReason() ?: FinishReason.CANCELLED))
                } catch (e: CancellationException) {
                    ts.close()
                } catch (t: Throwable) {
                    ts.close()
                    events.send(ChoiceEvent.Fail(index, t))
                }
            }
        }
    }

    override fun close() {
        streams.forEach { it.close() }
        events.cancel()
    }

    private companion object {
        const val EVENT_BUFFER = 64
    }
}
