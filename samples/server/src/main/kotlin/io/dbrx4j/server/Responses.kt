package io.dbrx4j.server

import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.node.JsonNodeFactory
import com.fasterxml.jackson.databind.node.ObjectNode
import io.dbrx4j.FinishReason
import io.dbrx4j.Token
import io.dbrx4j.Tokenizer
import java.util.UUID
import java.util.concurrent.ConcurrentHashMap

/** Texts of single tokens, for logprobs (special tokens kept, as OpenAI shows them). Thread-safe. */
class TokenTexts(private val tokenizer: Tokenizer?) {
    private val cache = ConcurrentHashMap<Int, String>()
    fun of(id: Int): String = cache.computeIfAbsent(id) { tokenizer?.decode(intArrayOf(it)) ?: "<$it>" }
}

/** What a choice has produced so far. */
class ChoiceState(val index: Int) {
    val text = StringBuilder()
    val tokens = ArrayList<Token>()
    var finish: FinishReason? = null
    var lastTokenNanos = 0L
}

fun finishName(r: FinishReason?): String? = when (r) {
    FinishReason.STOP -> "stop"
    FinishReason.LENGTH -> "length"
    FinishReason.CANCELLED -> "stop"
    null -> null
}

/**
 * The JSON bodies of one response: chat.completion / chat.completion.chunk, or text_completion, in
 * OpenAI's shapes.
 */
class ResponseShapes(private val endpoint: Endpoint, private val model: String, private val texts: TokenTexts, private val req: GenerationRequest) {
    private val f = JsonNodeFactory.instance
    val id = (if (endpoint == Endpoint.CHAT) "chatcmpl-" else "cmpl-") + UUID.randomUUID().toString().replace("-", "")
    val created = System.currentTimeMillis() / 1000

    private fun envelope(obj: String): ObjectNode = f.objectNode().apply {
        put("id", id)
        put("object", obj)
        put("created", created)
        put("model", model)
        put("system_fingerprint", "dbrx4j")
    }

    fun usage(promptTokens: Int, completionTokens: Int): ObjectNode = f.objectNode().apply {
        put("prompt_tokens", promptTokens)
        put("completion_tokens", completionTokens)
        put("total_tokens", promptTokens + completionTokens)
    }

    /** The non-streaming response. */
    fun whole(choices: List<ChoiceState>, promptTokens: Int): ObjectNode {
        val chat = endpoint == Endpoint.CHAT
        return envelope(if (chat) "chat.completion" else "text_completion").apply {
            val arr = putArray("choices")
            for (c in choices) {
                arr.addObject().apply {
                    put("index", c.index)
                    if (chat) {
                        putObject("message").apply {
                            put("role", "assistant")
                            put("content", c.text.toString())
                            putNull("refusal")
                        }
                    } else {
                        put("text", c.text.toString())
                    }
                    set<JsonNode>("logprobs", logprobs(c.tokens, 0))
                    put("finish_reason", finishName(c.finish))
                }
            }
            set<JsonNode>("usage", usage(promptTokens, choices.sumOf { it.tokens.size }))
        }
    }

    /** The first chunk of a chat choice: the role. */
    fun roleChunk(index: Int): ObjectNode = envelope("chat.completion.chunk").apply {
        putArray("choices").addObject().apply {
            put("index", index)
            putObject("delta").apply {
                put("role", "assistant")
                put("content", "")
            }
            putNull("logprobs")
            putNull("finish_reason")
        }
    }

    /** A chunk with [tokens]' text ([text]) for choice [index]; [textOffset] is where it starts. */
    fun deltaChunk(index: Int, text: String, tokens: List<Token>, textOffset: Int): ObjectNode = chunk(index) {
        if (endpoint == Endpoint.CHAT) putObject("delta").put("content", text) else put("text", text)
        set<JsonNode>("logprobs", logprobs(tokens, textOffset))
        putNull("finish_reason")
    }

    fun finishChunk(index: Int, reason: FinishReason?): ObjectNode = chunk(index) {
        if (endpoint == Endpoint.CHAT) putObject("delta") else put("text", "")
        putNull("logprobs")
        put("finish_reason", finishName(reason))
    }

    fun usageChunk(promptTokens: Int, completionTokens: Int): ObjectNode =
        envelope(if (endpoint == Endpoint.CHAT) "chat.completion.chunk" else "text_completion").apply {
            putArray("choices")
            set<JsonNode>("usage", usage(promptTokens, completionTokens))
        }

    private fun chunk(index: Int, fill: ObjectNode.() -> Unit): ObjectNode =
        envelope(if (endpoint == Endpoint.CHAT) "chat.completion.chunk" else "text_completion").apply {
            putArray("choices").addObject().apply {
                put("index", index)
                fill()
            }
        }

    /** null unless requested; chat: {"content":[...]}, completions: tokens / token_logprobs / top_logprobs / text_offset. */
    fun logprobs(tokens: List<Token>, textOffset: Int): JsonNode {
        if (!req.logprobs) return f.nullNode()
        return if (endpoint == Endpoint.CHAT) {
            f.objectNode().apply {
                val content = putArray("content")
                for (t in tokens) {
                    content.addObject().apply {
                        tokenFields(this, t.id, t.logprob)
                        val tops = putArray("top_logprobs")
                        for (alt in t.topLogprobs.take(req.topLogprobs)) tokenFields(tops.addObject(), alt.id, alt.logprob)
                    }
                }
                putNull("refusal")
            }
        } else {
            f.objectNode().apply {
                val toks = putArray("tokens")
                val lps = putArray("token_logprobs")
                val tops = putArray("top_logprobs")
                val offsets = putArray("text_offset")
                var offset = textOffset
                for (t in tokens) {
                    toks.add(texts.of(t.id))
                    lps.add(t.logprob.toDouble())
                    tops.addObject().apply { for (alt in t.topLogprobs.take(req.topLogprobs)) put(texts.of(alt.id), alt.logprob.toDouble()) }
                    offsets.add(offset)
                    offset += t.text.length
                }
            }
        }
    }

    private fun tokenFields(node: ObjectNode, id: Int, logprob: Float) {
        val text = texts.of(id)
        node.put("token", text)
        node.put("logprob", logprob.toDouble())
        val bytes = node.putArray("bytes")
        for (b in text.toByteArray(Charsets.UTF_8)) bytes.add(b.toInt() and 0xff)
    }
}

fun errorBody(e: ApiError): ObjectNode = JsonNodeFactory.instance.objectNode().apply {
    putObject("error").apply {
        put("message", e.message)
        put("type", e.type)
        if (e.param != null) put("param", e.param) else putNull("param")
        if (e.code != null) put("code", e.code) else putNull("code")
    }
}
