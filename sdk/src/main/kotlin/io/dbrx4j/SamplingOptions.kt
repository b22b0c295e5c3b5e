package io.dbrx4j

import java.util.Collections

/**
 * Every sampling option of the engine, plus what the SDK adds (stop strings). Immutable; build with
 * [builder]. Defaults: greedy (temperature 0), 256 tokens, stop on the checkpoint's eos ids and
 * `<|im_end|>`, no logprobs, no prompt logits.
 */
class SamplingOptions private constructor(b: Builder) {
    val temperature: Float = b.temperature
    val topK: Int = b.topK
    val topP: Float = b.topP
    val minP: Float = b.minP
    val repetitionPenalty: Float = b.repetitionPenalty
    val presencePenalty: Float = b.presencePenalty
    val frequencyPenalty: Float = b.frequencyPenalty
    /** null: the engine draws a seed. */
    val seed: Long? = b.seed
    val maxTokens: Int = b.maxTokens
    val logprobs: Boolean = b.logprobs
    val topLogprobs: Int = b.topLogprobs
    /** Keep the last prompt position's logits for [Completion.promptLogits]. */
    val promptLogits: Boolean = b.promptLogits
    val stopStrings: List<String> = Collections.unmodifiableList(b.stopStrings.toList())
    /** null: the checkpoint's eos ids plus `<|im_end|>`; empty: never stop on a token. */
    val stopTokenIds: List<Int>? = b.stopTokenIds?.let { Collections.unmodifiableList(it.toList()) }

    fun toBuilder(): Builder = Builder(this)

    class Builder internal constructor(from: SamplingOptions?) {
        internal var temperature = from?.temperature ?: 0f
        internal var topK = from?.topK ?: 0
        internal var topP = from?.topP ?: 1f
        internal var minP = from?.minP ?: 0f
        internal var repetitionPenalty = from?.repetitionPenalty ?: 1f
        internal var presencePenalty = from?.presencePenalty ?: 0f
        internal var frequencyPenalty = from?.frequencyPenalty ?: 0f
        internal var seed: Long? = from?.seed
        internal var maxTokens = from?.maxTokens ?: 256
        internal var logprobs = from?.logprobs ?: false
        internal var topLogprobs = from?.topLogprobs ?: 0
        internal var promptLogits = from?.promptLogits ?: false
        internal var stopStrings: MutableList<String> = from?.stopStrings?.toMutableList() ?: mutableListOf()
        internal var stopTokenIds: List<Int>? = from?.stopTokenIds

        /** 0 = greedy. */
        fun temperature(t: Float) = apply { temperature = t }
        /** 0 or -1 = off. */
        fun topK(k: Int) = apply { topK = k }
        fun topP(p: Float) = apply { topP = p }
        fun minP(p: Float) = apply { minP = p }
        fun repetitionPenalty(p: Float) = apply { repetitionPenalty = p }
        fun presencePenalty(p: Float) = apply { presencePenalty = p }
        fun frequencyPenalty(p: Float) = apply { frequencyPenalty = p }
        fun seed(seed: Long) = apply { this.seed = seed }
        fun maxTokens(n: Int) = apply { maxTokens = n }
        /** Report each sampled token's log-probability. */
        fun logprobs(enabled: Boolean) = apply { logprobs = enabled }
        /** Also report up to n (<= 20) alternatives per position; implies [logprobs]. */
        fun topLogprobs(n: Int) = apply { topLogprobs = n; if (n > 0) logprobs = true }
        /**
         * Keep the logits (vocabSize floats) of the last prompt position, the distribution the first token
         * is drawn from, for [Completion.promptLogits] and [TokenStream.promptLogits].
         */
        fun promptLogits(enabled: Boolean) = apply { promptLogits = enabled }
        /** Stop when the generated text contains one of these; the text ends before it. */
        fun stop(vararg strings: String) = apply { stopStrings.addAll(strings) }
        fun stopStrings(strings: List<String>) = apply { stopStrings = strings.toMutableList() }
        /** Replace the default stop tokens (eos ids, `<|im_end|>`); an empty list disables them. */
        fun stopTokenIds(ids: List<Int>) = apply { stopTokenIds = ids.toList() }
        fun build() = SamplingOptions(this)
    }

    companion object {
        @JvmStatic fun builder() = Builder(null)
        /** Greedy, 256 tokens. */
        @JvmField val DEFAULTS: SamplingOptions = builder().build()
        /** Greedy decoding of at most [maxTokens] tokens. */
        @JvmStatic fun greedy(maxTokens: Int): SamplingOptions = builder().maxTokens(maxTokens).build()
    }

    override fun toString() = "SamplingOptions(temperature=$temperature, topK=$topK, topP=$topP, minP=$minP, " +
        "repetitionPenalty=$repetitionPenalty, presencePenalty=$presencePenalty, frequencyPenalty=$frequencyPenalty, " +
        "seed=$seed, maxTokens=$maxTokens, logprobs=$logprobs, topLogprobs=$topLogprobs, promptLogits=$promptLogits, " +
        "stop=$stopStrings, stopTokenIds=$stopTokenIds)"
}
