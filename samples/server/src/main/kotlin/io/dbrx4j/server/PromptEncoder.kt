package io.dbrx4j.server

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer
import io.dbrx4j.ChatMessage
import io.dbrx4j.DbrxModel
import io.dbrx4j.Prompt
import java.nio.file.Files
import java.nio.file.Path

/** What a request asks to generate from, before tokenization. */
sealed class PromptInput {
    class Text(val text: String) : PromptInput()
    class Chat(val messages: List<ChatMessage>) : PromptInput()
    class Ids(val ids: IntArray) : PromptInput()
}

/**
 * Prompt text to token ids, exactly and without truncation.
 *
 * Works around an SDK gap: io.dbrx4j.Tokenizer opens tokenizer.json with DJL's defaults, which
 * truncate every encoding to 512 tokens (truncation LONGEST_FIRST, maxLength 512), so a longer prompt
 * would be cut silently and the context check would never fire. Until the SDK passes
 * truncation=false, the server encodes with its own DJL instance of the same tokenizer.json (same
 * call: no special tokens added, special tokens in the text recognised). Chat messages are still
 * rendered by the SDK's sandboxed template.
 */
class PromptEncoder private constructor(private val hf: HuggingFaceTokenizer?) : AutoCloseable {
    fun ids(model: DbrxModel, input: PromptInput): IntArray = when (input) {
        is PromptInput.Ids -> input.ids
        is PromptInput.Text -> encode(model, input.text)
        is PromptInput.Chat -> if (hf == null) model.promptIds(Prompt.chat(input.messages)) else encode(model, model.chatTemplate.render(input.messages, true))
    }

    private fun encode(model: DbrxModel, text: String): IntArray {
        val tok = hf ?: return model.promptIds(Prompt.text(text))
        if (text.isEmpty()) return IntArray(0)
        val ids = tok.encode(text, false, false).ids
        return IntArray(ids.size) { ids[it].toInt() }
    }

    override fun close() {
        hf?.close()
    }

    companion object {
        fun load(modelDir: Path): PromptEncoder {
            val file = modelDir.resolve("tokenizer.json")
            if (!Files.isRegularFile(file)) return PromptEncoder(null)
            if (System.getProperty("OPT_OUT_TRACKING") == null) System.setProperty("OPT_OUT_TRACKING", "true")
            return PromptEncoder(HuggingFaceTokenizer.newInstance(file, mapOf("addSpecialTokens" to "false", "truncation" to "false")))
        }
    }
}
