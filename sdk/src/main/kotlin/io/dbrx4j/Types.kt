package io.dbrx4j

import java.util.Collections

/** Why a generation ended. */
enum class FinishReason {
    /** A stop token (the checkpoint's eos ids, `<|im_end|>`) or a stop string was produced. */
    STOP,
    /** max tokens reached, or the context is full. */
    LENGTH,
    /** The caller cancelled (Flow cancelled, TokenStream closed, future cancelled). */
    CANCELLED,
}

/** One alternative at a position: a token id and its log-probability. */
class TopLogprob(val id: Int, val logprob: Float) {
    override fun toString() = "TopLogprob(id=$id, logprob=$logprob)"
}

/**
 * One generated token.
 *
 * [text] is the text this token releases: streaming detokenisation never splits a UTF-8 character, so a
 * token that ends inside a character (or inside a possible stop string) carries "" and a later token
 * carries the text. Concatenating [text] over a generation gives exactly [Completion.text].
 * [logprob] is NaN unless logprobs were requested; [topLogprobs] is empty unless top logprobs were.
 */
class Token internal constructor(
    val id: Int,
    val text: String,
    val logprob: Float,
    topLogprobs: List<TopLogprob>,
) {
    val topLogprobs: List<TopLogprob> = Collections.unmodifiableList(topLogprobs)
    override fun toString() = "Token(id=$id, text=${quote(text)}, logprob=$logprob)"
}

/** A finished generation. */
class Completion internal constructor(
    val text: String,
    tokens: List<Token>,
    val finishReason: FinishReason,
    val promptTokens: Int,
    private val lastPromptLogits: FloatArray? = null,
) {
    val tokens: List<Token> = Collections.unmodifiableList(tokens)
    /** The generated ids, in order (stop tokens included). */
    val tokenIds: IntArray get() = IntArray(tokens.size) { tokens[it].id }
    /**
     * The logits ([ModelInfo.vocabSize] floats) of the last prompt position, the distribution the first
     * token was drawn from; null unless [SamplingOptions.promptLogits] was set, or when the generation ended
     * before its first token. Each call returns a fresh copy.
     */
    val promptLogits: FloatArray? get() = lastPromptLogits?.copyOf()
    override fun toString() = "Completion(text=${quote(text)}, tokens=${tokens.size}, finishReason=$finishReason)"
}

/** A chat message; role is "system", "user" or "assistant" (any role the template accepts). */
class ChatMessage(val role: String, val content: String) {
    companion object {
        @JvmStatic fun system(content: String) = ChatMessage("system", content)
        @JvmStatic fun user(content: String) = ChatMessage("user", content)
        @JvmStatic fun assistant(content: String) = ChatMessage("assistant", content)
    }
    override fun equals(other: Any?) = other is ChatMessage && other.role == role && other.content == content
    override fun hashCode() = role.hashCode() * 31 + content.hashCode()
    override fun toString() = "ChatMessage(role=$role, content=${quote(content)})"
}

/** What to generate from: raw text, chat messages (rendered with the checkpoint's template), or token ids. */
class Prompt private constructor(
    internal val text: String?,
    internal val messages: List<ChatMessage>?,
    internal val ids: IntArray?,
) {
    companion object {
        /** Raw text, tokenized as is (special tokens such as `<|im_start|>` in it are recognised). */
        @JvmStatic fun text(text: String) = Prompt(text, null, null)
        /** Chat messages, rendered with add_generation_prompt = true. */
        @JvmStatic fun chat(messages: List<ChatMessage>) = Prompt(null, messages.toList(), null)
        @JvmStatic fun chat(vararg messages: ChatMessage) = Prompt(null, messages.toList(), null)
        /** Token ids, passed to the engine unchanged. */
        @JvmStatic fun ids(ids: IntArray) = Prompt(null, null, ids.copyOf())
    }
    override fun toString() = when {
        text != null -> "Prompt.text(${quote(text)})"
        messages != null -> "Prompt.chat($messages)"
        else -> "Prompt.ids(${ids!!.size} tokens)"
    }
}

/** Shape of the loaded model (native dbrx_model_info). */
class ModelInfo internal constructor(
    val vocabSize: Int,
    val maxContext: Int,
    val dModel: Int,
    val layers: Int,
    val heads: Int,
    val kvHeads: Int,
    val headDim: Int,
    val experts: Int,
    val expertsPerToken: Int,
    val ffnHidden: Int,
    eosIds: List<Int>,
    val weightBytes: Long,
    val device: Device,
) {
    val eosIds: List<Int> = Collections.unmodifiableList(eosIds)
    override fun toString() = "ModelInfo(vocab=$vocabSize, ctx=$maxContext, d_model=$dModel, layers=$layers, " +
        "heads=$heads/$kvHeads x $headDim, experts=$experts top-$expertsPerToken, ffn=$ffnHidden, eos=$eosIds, " +
        "weights=$weightBytes B on $device)"
}

/** Engine counters (native dbrx_engine_stats). */
class EngineStats internal constructor(
    val running: Int,
    val waiting: Int,
    val blocksTotal: Int,
    val blocksUsed: Int,
    val blocksFree: Int,
    val blocksCached: Int,
    val blockSize: Int,
    val kvCapacityTokens: Long,
    val prefixQueryTokens: Long,
    val prefixHitTokens: Long,
    val preemptions: Long,
    val steps: Long,
    val promptTokens: Long,
    val generatedTokens: Long,
    val finishedRequests: Long,
    val tokensPerSecond: Double,
) {
    override fun toString() = "EngineStats(running=$running, waiting=$waiting, blocks used/free/cached/total=" +
        "$blocksUsed/$blocksFree/$blocksCached/$blocksTotal, steps=$steps, prompt=$promptTokens, " +
        "generated=$generatedTokens, finished=$finishedRequests, tok/s=${"%.1f".format(tokensPerSecond)})"
}

internal fun quote(s: String): String =
    "\"" + (if (s.length > 60) s.take(57) + "..." else s).replace("\n", "\\n") + "\""
