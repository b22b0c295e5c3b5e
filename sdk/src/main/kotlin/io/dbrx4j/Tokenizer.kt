package io.dbrx4j

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer
import java.nio.file.Files
import java.nio.file.Path
import java.util.concurrent.locks.ReentrantReadWriteLock
import kotlin.concurrent.read
import kotlin.concurrent.write

/**
 * The checkpoint's `tokenizer.json` through DJL's Hugging Face tokenizers binding.
 *
 * Special tokens written in the text (`<|im_start|>`, `<|endoftext|>`, ...) encode to their ids, as
 * DBRX's tokenizer does; nothing is added around the text (DBRX has no BOS). [decode] keeps special
 * tokens, so encode/decode round-trips; generated text is decoded without them. Thread-safe; after
 * [close] every call throws [DbrxClosedException] (the native tokenizer is never used once freed).
 */
class Tokenizer private constructor(private val hf: HuggingFaceTokenizer) : AutoCloseable {
    private val lock = ReentrantReadWriteLock()
    private var closed = false

    private inline fun <T> use(block: () -> T): T = lock.read {
        if (closed) throw DbrxClosedException("the tokenizer was closed")
        block()
    }

    /** Token ids of [text], exactly as the checkpoint's tokenizer produces them. */
    fun encode(text: String): IntArray {
        if (text.isEmpty()) return IntArray(0)
        val ids = use { hf.encode(text, false, false).ids }
        return IntArray(ids.size) { ids[it].toInt() }
    }

    /** Text of [ids], special tokens included. */
    fun decode(ids: IntArray): String = decode(ids, false)

    fun decode(ids: IntArray, skipSpecialTokens: Boolean): String {
        if (ids.isEmpty()) return ""
        val longs = LongArray(ids.size) { ids[it].toLong() }
        return use { hf.decode(longs, skipSpecialTokens) }
    }

    /** The id of a token that encodes alone to one id (a special token such as `<|im_end|>`), else null. */
    fun tokenId(token: String): Int? = encode(token).singleOrNull()?.takeIf { decode(intArrayOf(it)) == token }

    /** Idempotent and thread-safe. */
    override fun close() = lock.write {
        if (!closed) {
            closed = true
            hf.close()
        }
    }

    companion object {
        /** Reads `tokenizer.json` from a checkpoint directory (or the file itself). */
        @JvmStatic
        fun load(path: Path): Tokenizer {
            val file = if (Files.isDirectory(path)) path.resolve("tokenizer.json") else path
            if (!Files.isRegularFile(file)) {
                throw DbrxBadCheckpointException("BAD_CHECKPOINT", "no tokenizer.json at $file")
            }
            // DJL reports usage over the network unless told not to; this library never phones home.
            if (System.getProperty("OPT_OUT_TRACKING") == null) System.setProperty("OPT_OUT_TRACKING", "true")
            val hf = try {
                // The file alone, not the directory: tokenizer_config.json's clean_up_tokenization_spaces
                // would rewrite decoded text, which DBRX's tiktoken-based tokenizer never does.
                // DJL truncates to 512 tokens and may pad unless told not to; prompts are taken whole.
                HuggingFaceTokenizer.newInstance(
                    file,
                    mapOf("addSpecialTokens" to "false", "truncation" to "false", "padding" to "false"),
                )
            } catch (e: Exception) {
                throw DbrxBadCheckpointException("BAD_CHECKPOINT", "cannot read $file: ${e.message}", e)
            }
            return Tokenizer(hf)
        }
    }
}
