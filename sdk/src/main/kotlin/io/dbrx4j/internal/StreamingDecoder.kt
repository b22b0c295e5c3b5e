package io.dbrx4j.internal

import io.dbrx4j.Tokenizer

/**
 * Incremental detokenisation. Byte-level BPE tokens can end inside a UTF-8 character; decoding such a
 * prefix yields U+FFFD, so text is released only once the window decodes cleanly, and the window is
 * kept short (it restarts after each release) so every step costs two small decodes.
 */
internal class StreamingDecoder(private val tokenizer: Tokenizer) {
    private val ids = ArrayList<Int>()
    private var prefixOffset = 0
    private var readOffset = 0

    /** Ids whose text is not released yet (an unfinished character, or tokens that decode to nothing). */
    val hasPending: Boolean get() = readOffset < ids.size

    /** Adds one generated id; returns the text it completes ("" while a character is unfinished). */
    fun push(id: Int): String {
        ids.add(id)
        val prefix = decode(prefixOffset, readOffset)
        val full = decode(prefixOffset, ids.size)
        if (full.length <= prefix.length || full.endsWith(REPLACEMENT)) return ""
        prefixOffset = readOffset
        readOffset = ids.size
        return full.substring(prefix.length)
    }

    /** At the end of generation: whatever the last ids decode to, even an unfinished character. */
    fun flush(): String {
        val prefix = decode(prefixOffset, readOffset)
        val full = decode(prefixOffset, ids.size)
        prefixOffset = ids.size
        readOffset = ids.size
        return if (full.length > prefix.length) full.substring(prefix.length) else ""
    }

    private fun decode(from: Int, to: Int): String =
        if (from >= to) "" else tokenizer.decode(ids.subList(from, to).toIntArray(), true)

    private companion object {
        const val REPLACEMENT = '\uFFFD'
    }
}
