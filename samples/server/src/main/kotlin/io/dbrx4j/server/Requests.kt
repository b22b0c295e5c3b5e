package io.dbrx4j.server

import com.fasterxml.jackson.databind.JsonNode
import io.dbrx4j.ChatMessage
import io.dbrx4j.SamplingOptions

enum class Endpoint(val path: String) {
    CHAT("/v1/chat/completions"),
    COMPLETIONS("/v1/completions"),
}

/**
 * A validated /v1/chat/completions or /v1/completions body. Every field the engine can honour is
 * carried; fields it cannot (tools, structured output, logit_bias, ...) were rejected by name while
 * parsing, and fields this API does not know are ignored, as OpenAI's own server does.
 */
class GenerationRequest(
    val endpoint: Endpoint,
    val model: String?,
    val prompts: List<PromptInput>,
    val n: Int,
    /** null: as many as fit, up to the server's limit. */
    val maxTokens: Int?,
    val stream: Boolean,
    val includeUsage: Boolean,
    /** Sampling without max_tokens and seed, which are set per choice. */
    val sampling: SamplingOptions,
    val seed: Long?,
    val logprobs: Boolean,
    val topLogprobs: Int,
    val user: String?,
) {
    val choices: Int get() = prompts.size * n
}

object RequestParser {
    private val CHAT_ROLES = mapOf("system" to "system", "developer" to "system", "user" to "user", "assistant" to "assistant")

    fun parse(endpoint: Endpoint, body: JsonNode, limits: ServerConfig): GenerationRequest {
        if (!body.isObject) throw ApiError.invalid(null, "the request body must be a JSON object", code = "invalid_type")
        val f = JsonFields(body)
        rejectUnsupported(endpoint, f)
        val prompts = if (endpoint == Endpoint.CHAT) listOf(chatPrompt(f)) else completionPrompts(f)
        val n = f.int("n", 1, Int.MAX_VALUE.toLong())?.toInt() ?: 1
        if (n.toLong() * prompts.size > limits.maxN) {
            val what = if (prompts.size > 1) "n ($n) times ${prompts.size} prompts" else "n ($n)"
            throw ApiError.invalid("n", "$what exceeds this server's limit of ${limits.maxN} choices per request")
        }
        val maxTokens = maxTokens(endpoint, f, limits)
        val stream = f.bool("stream") ?: false
        val includeUsage = f.raw("stream_options")?.let { so ->
            if (!so.isObject) throw f.typeError("stream_options", "an object", so)
            if (!stream) throw ApiError.invalid("stream_options", "stream_options is only allowed with stream: true")
            JsonFields(so, "stream_options.").bool("include_usage")
        } ?: false

        val b = SamplingOptions.builder()
        f.number("temperature", 0.0, 2.0)?.let { b.temperature(it) }
        f.number("top_p", 0.0, 1.0, minExclusive = true)?.let { b.topP(it) }
        f.int("top_k", -1, Int.MAX_VALUE.toLong())?.let { b.topK(it.toInt()) }
        f.number("min_p", 0.0, 1.0)?.let { b.minP(it) }
        f.number("presence_penalty", -2.0, 2.0)?.let { b.presencePenalty(it) }
        f.number("frequency_penalty", -2.0, 2.0)?.let { b.frequencyPenalty(it) }
        f.number("repetition_penalty", 0.0, 10.0, minExclusive = true)?.let { b.repetitionPenalty(it) }
        val seed = f.int("seed", Long.MIN_VALUE, Long.MAX_VALUE)
        b.stopStrings(stops(f, limits))

        val (logprobs, top) = logprobs(endpoint, f)
        b.logprobs(logprobs)
        if (top > 0) b.topLogprobs(top)
        return GenerationRequest(
            endpoint, f.string("model"), prompts, n, maxTokens, stream, includeUsage, b.build(), seed,
            logprobs, top, f.string("user"),
        )
    }

    /** Fields with a meaning this engine cannot give yet: refused, never silently dropped. */
    private fun rejectUnsupported(endpoint: Endpoint, f: JsonFields) {
        f.raw("tools")?.let { if (!(it.isArray && it.isEmpty)) throw ApiError.unsupported("tools", "tools (function calling) are not supported by this server") }
        f.raw("functions")?.let { if (!(it.isArray && it.isEmpty)) throw ApiError.unsupported("functions", "functions (function calling) are not supported by this server") }
        f.raw("tool_choice")?.let { if (!(it.isTextual && it.asText() == "none")) throw ApiError.unsupported("tool_choice", "tool_choice is not supported by this server (only \"none\")") }
        f.raw("function_call")?.let { if (!(it.isTextual && it.asText() == "none")) throw ApiError.unsupported("function_call", "function_call is not supported by this server (only \"none\")") }
        f.raw("response_format")?.let { rf ->
            val type = rf.get("type")?.asText()
            if (type != "text") {
                throw ApiError.unsupported("response_format", "response_format ${type ?: "without a type"} is not supported by this server (only {\"type\": \"text\"}): structured output needs constrained decoding")
            }
        }
        f.raw("logit_bias")?.let { if (!(it.isObject && it.isEmpty)) throw ApiError.unsupported("logit_bias", "logit_bias is not supported by this server") }
        f.raw("modalities")?.let { m ->
            if (!m.isArray || m.any { it.asText() != "text" }) throw ApiError.unsupported("modalities", "only the \"text\" modality is supported")
        }
        for (name in listOf("audio", "prediction", "web_search_options", "reasoning_effort")) {
            if (f.has(name)) throw ApiError.unsupported(name, "$name is not supported by this server")
        }
        if (endpoint == Endpoint.COMPLETIONS) {
            if (f.bool("echo") == true) throw ApiError.unsupported("echo", "echo is not supported by this server")
            f.string("suffix")?.let { if (it.isNotEmpty()) throw ApiError.unsupported("suffix", "suffix (insertion) is not supported by this server") }
            f.int("best_of", 1, Int.MAX_VALUE.toLong())?.let { bo ->
                val n = f.int("n", 1, Int.MAX_VALUE.toLong()) ?: 1
                if (bo != n) throw ApiError.unsupported("best_of", "best_of other than n is not supported by this server")
            }
        }
    }

    private fun chatPrompt(f: JsonFields): PromptInput {
        val messages = f.raw("messages") ?: throw ApiError.invalid("messages", "messages is required", code = "missing_required_parameter")
        if (!messages.isArray) throw f.typeError("messages", "an array", messages)
        if (messages.isEmpty) throw ApiError.invalid("messages", "messages must not be empty")
        return PromptInput.Chat(messages.mapIndexed { i, m -> chatMessage(i, m) })
    }

    private fun chatMessage(i: Int, m: JsonNode): ChatMessage {
        val at = "messages[$i]"
        if (!m.isObject) throw ApiError.invalid(at, "$at must be an object, got ${JsonFields.describe(m)}", code = "invalid_type")
        val f = JsonFields(m, "$at.")
        val role = f.string("role") ?: throw ApiError.invalid("$at.role", "$at.role is required", code = "missing_required_parameter")
        if (role == "tool" || role == "function") {
            throw ApiError.unsupported("$at.role", "$at.role '$role' needs function calling, which this server does not support")
        }
        val mapped = CHAT_ROLES[role]
            ?: throw ApiError.invalid("$at.role", "$at.role '$role' is not one of system, developer, user, assistant")
        if (f.has("tool_calls") || f.has("function_call")) {
            throw ApiError.unsupported("$at.tool_calls", "$at carries tool calls: function calling is not supported by this server")
        }
        if (f.has("audio")) throw ApiError.unsupported("$at.audio", "$at.audio is not supported by this server")
        f.string("name")?.let { throw ApiError.unsupported("$at.name", "$at.name (participant names) is not supported by this server's chat template") }
        return ChatMessage(mapped, content(f, at))
    }

    private fun content(f: JsonFields, at: String): String {
        val c = f.raw("content") ?: throw ApiError.invalid("$at.content", "$at.content is required", code = "missing_required_parameter")
        if (c.isTextual) return c.asText()
        if (!c.isArray) throw f.typeError("content", "a string or an array of text parts", c)
        return buildString {
            c.forEachIndexed { j, part ->
                val type = part.get("type")?.asText()
                if (type != "text") {
                    throw ApiError.unsupported("$at.content[$j].type", "$at.content[$j] has type '$type': only text parts are supported")
                }
                val text = part.get("text")
                if (text == null || !text.isTextual) throw ApiError.invalid("$at.content[$j].text", "$at.content[$j].text must be a string", code = "invalid_type")
                append(text.asText())
            }
        }
    }

    /** prompt: a string, a list of strings, a list of token ids, or a list of such lists. */
    private fun completionPrompts(f: JsonFields): List<PromptInput> {
        val p = f.raw("prompt") ?: throw ApiError.invalid("prompt", "prompt is required", code = "missing_required_parameter")
        if (p.isTextual) return listOf(PromptInput.Text(p.asText()))
        if (!p.isArray) throw f.typeError("prompt", "a string, an array of strings or an array of token ids", p)
        if (p.isEmpty) throw ApiError.invalid("prompt", "prompt must not be empty")
        if (p.all { it.isIntegralNumber }) return listOf(PromptInput.Ids(tokenIds("prompt", p)))
        return p.mapIndexed { i, item ->
            when {
                item.isTextual -> PromptInput.Text(item.asText())
                item.isArray && item.all { it.isIntegralNumber } && !item.isEmpty -> PromptInput.Ids(tokenIds("prompt[$i]", item))
                else -> throw ApiError.invalid("prompt[$i]", "prompt[$i] must be a string or a non-empty array of token ids", code = "invalid_type")
            }
        }
    }

    private fun tokenIds(at: String, node: JsonNode): IntArray = IntArray(node.size()) { j ->
        val v = node.get(j).longValue()
        if (v < 0 || v > Int.MAX_VALUE) throw ApiError.invalid(at, "$at[$j] is not a token id: $v")
        v.toInt()
    }

    private fun maxTokens(endpoint: Endpoint, f: JsonFields, limits: ServerConfig): Int? {
        val names = if (endpoint == Endpoint.CHAT) listOf("max_completion_tokens", "max_tokens") else listOf("max_tokens")
        for (name in names) {
            val v = f.int(name, Long.MIN_VALUE, Long.MAX_VALUE) ?: continue
            if (v < 1) throw ApiError.invalid(name, "$name must be at least 1, got $v")
            if (v > limits.maxTokens) throw ApiError.invalid(name, "$name ($v) exceeds this server's limit of ${limits.maxTokens}")
            return v.toInt()
        }
        // OpenAI's legacy completions default to 16 tokens; chat defaults to as many as fit.
        return if (endpoint == Endpoint.COMPLETIONS) minOf(16, limits.maxTokens) else null
    }

    private fun stops(f: JsonFields, limits: ServerConfig): List<String> {
        val s = f.raw("stop") ?: return emptyList()
        val list = when {
            s.isTextual -> listOf(s.asText())
            s.isArray -> s.mapIndexed { i, v ->
                if (!v.isTextual) throw ApiError.invalid("stop", "stop[$i] must be a string, got ${JsonFields.describe(v)}", code = "invalid_type")
                v.asText()
            }
            else -> throw f.typeError("stop", "a string or an array of strings", s)
        }
        if (list.size > limits.maxStop) throw ApiError.invalid("stop", "stop has ${list.size} strings; this server's limit is ${limits.maxStop}")
        if (list.any { it.isEmpty() }) throw ApiError.invalid("stop", "stop strings must not be empty")
        return list
    }

    /** Chat: logprobs (bool) + top_logprobs (0..20). Completions: logprobs (0..20) = that many alternatives. */
    private fun logprobs(endpoint: Endpoint, f: JsonFields): Pair<Boolean, Int> {
        if (endpoint == Endpoint.COMPLETIONS) {
            val n = f.int("logprobs", 0, MAX_TOP_LOGPROBS.toLong()) ?: return false to 0
            return true to n.toInt()
        }
        val enabled = f.bool("logprobs") ?: false
        val top = f.int("top_logprobs", 0, MAX_TOP_LOGPROBS.toLong())?.toInt() ?: 0
        if (top > 0 && !enabled) throw ApiError.invalid("top_logprobs", "top_logprobs needs logprobs: true")
        return enabled to top
    }

    const val MAX_TOP_LOGPROBS = 20
}
