package io.dbrx4j.server

import com.fasterxml.jackson.databind.JsonNode
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.DelicateCoroutinesApi
import kotlinx.coroutines.GlobalScope
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.util.concurrent.CompletableFuture

/**
 * Every invalid input gets its documented status and OpenAI's error shape, while a concurrent stream
 * runs to a correct end.
 */
class ValidationTest {
    private val server = TestServer.shared
    private val chat = Endpoint.CHAT.path
    private val completions = Endpoint.COMPLETIONS.path

    private class Case(val path: String, val body: String?, val status: Int, val param: String?, val auth: String? = "default", val get: Boolean = false)

    private fun chatBody(extra: String, messages: String = """[{"role":"user","content":"hi"}]""") =
        """{"model":"tiny-dbrx-cl100k","messages":$messages${if (extra.isEmpty()) "" else ",$extra"}}"""

    private fun completionBody(extra: String) = """{"model":"tiny-dbrx-cl100k","prompt":"hi"${if (extra.isEmpty()) "" else ",$extra"}}"""

    private val cases = listOf(
        Case(chat, chatBody(""""temperature": NaN"""), 400, "temperature"),
        Case(chat, chatBody(""""temperature": 2.5"""), 400, "temperature"),
        Case(chat, chatBody(""""temperature": "hot""""), 400, "temperature"),
        Case(chat, chatBody(""""top_p": 0"""), 400, "top_p"),
        Case(chat, chatBody(""""top_p": 1.5"""), 400, "top_p"),
        Case(chat, chatBody(""""top_k": -2"""), 400, "top_k"),
        Case(chat, chatBody(""""min_p": 1.5"""), 400, "min_p"),
        Case(chat, chatBody(""""presence_penalty": 3"""), 400, "presence_penalty"),
        Case(chat, chatBody(""""frequency_penalty": -2.5"""), 400, "frequency_penalty"),
        Case(chat, chatBody(""""repetition_penalty": 0"""), 400, "repetition_penalty"),
        Case(chat, chatBody(""""repetition_penalty": Infinity"""), 400, "repetition_penalty"),
        Case(chat, chatBody(""""max_tokens": 0"""), 400, "max_tokens"),
        Case(chat, chatBody(""""max_completion_tokens": -5"""), 400, "max_completion_tokens"),
        Case(chat, chatBody(""""max_tokens": 100000"""), 400, "max_tokens"),
        Case(chat, chatBody(""""seed": "abc""""), 400, "seed"),
        Case(chat, chatBody(""""n": 0"""), 400, "n"),
        Case(chat, chatBody(""""n": 99"""), 400, "n"),
        Case(chat, chatBody(""""stop": 5"""), 400, "stop"),
        Case(chat, chatBody(""""stop": [${(1..20).joinToString(",") { "\"s$it\"" }}]"""), 400, "stop"),
        Case(chat, chatBody(""""top_logprobs": 25, "logprobs": true"""), 400, "top_logprobs"),
        Case(chat, chatBody(""""top_logprobs": 2"""), 400, "top_logprobs"),
        Case(chat, chatBody(""""stream_options": {"include_usage": true}"""), 400, "stream_options"),
        Case(chat, chatBody(""""tools": [{"type":"function","function":{"name":"f"}}]"""), 400, "tools"),
        Case(chat, chatBody(""""tool_choice": "auto""""), 400, "tool_choice"),
        Case(chat, chatBody(""""response_format": {"type":"json_schema","json_schema":{"name":"x","schema":{}}}"""), 400, "response_format"),
        Case(chat, chatBody(""""logit_bias": {"50256": -100}"""), 400, "logit_bias"),
        Case(chat, chatBody("", "[]"), 400, "messages"),
        Case(chat, """{"model":"tiny-dbrx-cl100k"}""", 400, "messages"),
        Case(chat, chatBody("", """[{"role":"wizard","content":"hi"}]"""), 400, "messages[0].role"),
        Case(chat, chatBody("", """[{"role":"user"}]"""), 400, "messages[0].content"),
        Case(chat, chatBody("", """[{"role":"tool","content":"42","tool_call_id":"x"}]"""), 400, "messages[0].role"),
        Case(chat, chatBody("", """[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"""), 400, "messages[0].content[0].type"),
        Case(chat, "{not json", 400, null),
        Case(chat, "[1,2]", 400, null),
        Case(chat, """{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}""", 404, "model"),
        Case(completions, """{"model":"tiny-dbrx-cl100k"}""", 400, "prompt"),
        Case(completions, """{"model":"tiny-dbrx-cl100k","prompt":5}""", 400, "prompt"),
        Case(completions, completionBody(""""echo": true"""), 400, "echo"),
        Case(completions, completionBody(""""suffix": "end""""), 400, "suffix"),
        Case(completions, completionBody(""""best_of": 3"""), 400, "best_of"),
        Case(completions, completionBody(""""logprobs": 30"""), 400, "logprobs"),
        Case(completions, """{"model":"tiny-dbrx-cl100k","prompt":[999999]}""", 400, "prompt"),
        Case(completions, """{"model":"tiny-dbrx-cl100k","prompt":"${"hello ".repeat(100)}","max_tokens":2000}""", 400, "max_tokens"),
        Case(completions, """{"model":"tiny-dbrx-cl100k","prompt":"${"hello ".repeat(1900)}","max_tokens":200}""", 400, "max_tokens"),
        Case(completions, """{"model":"tiny-dbrx-cl100k","prompt":"${"hello ".repeat(2100)}"}""", 400, "max_tokens"),
        Case(completions, """{"model":"tiny-dbrx-cl100k","prompt":"${"x".repeat(2_000_000)}"}""", 413, null),
        Case(chat, chatBody(""""max_tokens": 2"""), 401, null, auth = null),
        Case(chat, chatBody(""""max_tokens": 2"""), 401, null, auth = "Bearer wrong-key"),
        Case("/v1/models", null, 401, null, auth = null, get = true),
        Case("/metrics", null, 401, null, auth = null, get = true),
        Case("/v1/embeddings", """{"input":"x"}""", 404, null),
    )

    private fun assertErrorShape(body: String, what: String): JsonNode {
        val error = TestServer.MAPPER.readTree(body).get("error")
        assertTrue(error != null && error.isObject, "$what: no error object in $body")
        assertTrue(error.get("message").isTextual && error.get("message").asText().isNotBlank(), "$what: message")
        assertTrue(error.get("type").isTextual, "$what: type")
        assertTrue(error.has("param") && error.has("code"), "$what: param and code keys")
        return error
    }

    @Test
    fun `every invalid input gets its status and error shape while a concurrent stream completes`() {
        val streamBody = """{"model":"tiny-dbrx-cl100k","prompt":"A long concurrent stream","max_tokens":300,"stream":true,"stream_options":{"include_usage":true}}"""
        val expected = server.json(completions, streamBody.replace(""","stream":true,"stream_options":{"include_usage":true}""", ""))
            .get("choices")[0].get("text").asText()
        val stream = CompletableFuture.supplyAsync { server.events(completions, streamBody) }

        for (c in cases) {
            val auth = if (c.auth == "default") "Bearer ${TestServer.KEY}" else c.auth
            val r = server.send(c.path, if (c.get) null else c.body, auth)
            val what = "${c.path} ${c.body?.take(120)}"
            assertEquals(c.status, r.statusCode(), "$what -> ${r.body()}")
            val error = assertErrorShape(r.body(), what)
            if (c.param != null) assertEquals(c.param, error.get("param").asText(), "$what: ${r.body()}")
        }
        // The context error names the limit.
        val ctx = server.send(completions, """{"model":"tiny-dbrx-cl100k","prompt":"${"hello ".repeat(100)}","max_tokens":2000}""")
        assertTrue(ctx.body().contains("2048"), ctx.body())
        assertEquals("context_length_exceeded", TestServer.MAPPER.readTree(ctx.body()).get("error").get("code").asText())
        // Unknown fields are ignored; /health needs no key.
        assertEquals(200, server.send(completions, completionBody(""""max_tokens": 2, "frobnicate": {"x": 1}""")).statusCode())
        assertEquals(200, server.send("/health", auth = null).statusCode())

        val events = stream.get()
        assertEquals("[DONE]", events.last())
        val chunks = events.dropLast(1).map { TestServer.MAPPER.readTree(it) }
        val usage = chunks.last().get("usage")
        assertEquals(300, usage.get("completion_tokens").asInt())
        val text = chunks.flatMap { it.get("choices").toList() }.joinToString("") { it.get("text").asText() }
        assertEquals(expected, text)
        val finishes = chunks.flatMap { it.get("choices").toList() }.map { it.get("finish_reason") }.filter { !it.isNull }
        assertEquals(listOf("length"), finishes.map { it.asText() })
        assertTrue(chunks.flatMap { it.get("choices").toList() }.last().get("finish_reason").asText() == "length")
    }

    @OptIn(DelicateCoroutinesApi::class)
    @Test
    fun `a full queue answers 429 and frees up afterwards`() {
        TestServer(TestServer.config().copy(maxConcurrent = 1, maxQueue = 0)).use { s ->
            s.awaitReady()
            val gate = CompletableDeferred<Unit>()
            val holder = GlobalScope.launch { s.server.admission.withSlot { gate.await() } }
            while (s.server.admission.running == 0) Thread.sleep(5)
            val body = completionBody(""""max_tokens": 2""")
            val r = s.send(completions, body)
            assertEquals(429, r.statusCode(), r.body())
            assertEquals("queue_full", assertErrorShape(r.body(), "429").get("code").asText())
            gate.complete(Unit)
            runBlocking { holder.join() }
            assertEquals(200, s.send(completions, body).statusCode())
            assertFalse(s.send("/metrics").body().lines().none { it.startsWith("dbrx_requests_total{endpoint=\"/v1/completions\",status=\"429\"} 1") })
        }
    }
}
