package io.dbrx4j.internal

import io.dbrx4j.Token
import io.dbrx4j.TopLogprob
import io.dbrx4j.Tokenizer

/**
 * Turns native tokens into [Token]s whose texts concatenate to the completion text: detokenises
 * incrementally and holds back any text that could still start a stop string. A token whose text is not
 * final yet (an unfinished UTF-8 character, a possible stop-string prefix) stays pending until a later
 * token settles it or the generation ends, so the last token can always carry the last of the text.
 */
internal class TokenAssembler(tokenizer: Tokenizer?, private val stopStrings: List<String>) {
    private val decoder = tokenizer?.let { StreamingDecoder(it) }
    private val pending = ArrayList<NativeToken>()
    private val held = StringBuilder()    // decoded, not yet released: may begin a stop string
    private val carry = StringBuilder()   // released, not yet attached to an emitted token

    /** True once a stop string was found; later tokens must not be accepted. */
    var stopped = false
        private set

    fun accept(token: NativeToken): List<Token> {
        check(!stopped) { "accept after a stop string" }
        pending.add(token)
        decoder?.let { held.append(it.push(token.id)) }
        return release(final = false)
    }

    /** The generation ended: settle every pending token. */
    fun finish(): List<Token> {
        if (!stopped) decoder?.let { held.append(it.flush()) }
        return release(final = true)
    }

    private fun release(final: Boolean): List<Token> {
        val match = firstStopMatch()
        if (match >= 0) {
            carry.append(held, 0, match)
            held.setLength(0)
            stopped = true
            return emit(pending.size)
        }
        val keep = if (final) 0 else longestStopPrefixSuffix()
        carry.append(held, 0, held.length - keep)
        held.delete(0, held.length - keep)
        val unsettled = !final && (held.isNotEmpty() || decoder?.hasPending == true)
        return emit(if (unsettled) pending.size - 1 else pending.size)
    }

    /** Emits the first [n] pending tokens; the released text goes to the last of them. */
    private fun emit(n: Int): List<Token> {
        if (n <= 0) return emptyList()
        val out = ArrayList<Token>(n)
        for (i in 0 until n) {
            val t = pending[i]
            val text = if (i == n - 1) carry.toString().also { carry.setLength(0) } else ""
            val tops = t.topIds.indices.map { TopLogprob(t.topIds[it], t.topLogprobs[it]) }
            out.add(Token(t.id, text, t.logprob, tops))
        }
        pending.subList(0, n).clear()
        return out
    }

    private fun firstStopMatch(): Int {
        var best = -1
        for (s in stopStrings) {
            if (s.isEmpty()) continue
            val i = held.indexOf(s)
            if (i >= 0 && (best < 0 || i < best)) best = i
        }
        return best
    }

    /** Length of the longest suffix of [held] that is a proper prefix of some stop string. */
    private fun longestStopPrefixSuffix(): Int {
        var best = 0
        for (s in stopStrings) {
            val max = minOf(s.length - 1, held.length)
            for (k in max downTo best + 1) {
                if (held.regionMatches(held.length - k, s, 0, k)) { best = k; break }
            }
        }
        return best
    }
}

private fun StringBuilder.regionMatches(start: Int, other: String, otherStart: Int, len: Int): Boolean {
    for (i in 0 until len) if (this[start + i] != other[otherStart + i]) return false
    return true
}
