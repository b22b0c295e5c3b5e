package io.dbrx4j.server

import com.openai.client.OpenAIClient
import com.openai.client.okhttp.OpenAIOkHttpClient
import com.openai.errors.BadRequestException
import com.openai.errors.NotFoundException
import com.openai.errors.UnauthorizedException
import com.openai.models.chat.completions.ChatCompletionCreateParams
import com.openai.models.chat.completions.ChatCompletionStreamOptions
import com.openai.models.completions.CompletionCreateParams
import io.dbrx4j.ChatMessage
import io.dbrx4j.Prompt
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotEquals
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import kotlin.jvm.optionals.getOrNull

/** The official OpenAI Java SDK against the real server: chat and completions, streaming and not. */
class OpenAiSdkTest {
    private val server = TestServer.shared
    private val client: OpenAIClient = OpenAIOkHttpClient.builder()
        .baseUrl(server.base + "/v1").apiKey(TestServer.KEY).maxRetries(0).build()
    private val model = "tiny-dbrx-cl100k"

    private fun chat(user: String) = ChatCompletionCreateParams.builder().model(model).addUserMessage(user)

    @Test
    fun `chat completion reports the rendered prompt's tokens, max tokens and length`() {
        val r = client.chat().completions().create(chat("Hello there").maxCompletionTokens(12).build())
        val choice = r.choices().single()
        val expectedPrompt = server.host.model!!.promptIds(Prompt.chat(ChatMessage.user("Hello there"))).size
        val usage = r.usage().get()
        assertEquals(expectedPrompt.toLong(), usage.promptTokens())
        assertEquals(12L, usage.completionTokens())
        assertEquals("length", choice.finishReason().asString())
        assertTrue(choice.message().content().get().isNotEmpty())
        assertEquals(model, r.model())
    }

    @Test
    fun `streamed chat equals the non-streamed greedy answer, with usage and finish reason last`() {
        val params = chat("Stream me").maxCompletionTokens(16)
        val whole = client.chat().completions().create(params.build()).choices().single().message().content().get()
        val text = StringBuilder()
        var finish: String? = null
        var usageTokens = -1L
        var chunksAfterFinish = 0
        client.chat().completions().createStreaming(
            params.streamOptions(ChatCompletionStreamOptions.builder().includeUsage(true).build()).build(),
        ).use { s ->
            s.stream().forEach { chunk ->
                chunk.usage().getOrNull()?.let { usageTokens = it.completionTokens() }
                for (c in chunk.choices()) {
                    if (finish != null) chunksAfterFinish++
                    c.delta().content().getOrNull()?.let { text.append(it) }
                    c.finishReason().getOrNull()?.let { finish = it.asString() }
                }
            }
        }
        assertEquals(whole, text.toString())
        assertEquals("length", finish)
        assertEquals(0, chunksAfterFinish)
        assertEquals(16L, usageTokens)
    }

    @Test
    fun `completions, streaming and not, agree`() {
        val params = CompletionCreateParams.builder().model(model).prompt("Once upon a time").maxTokens(10)
        val whole = client.completions().create(params.build())
        val choice = whole.choices().single()
        assertEquals("length", choice.finishReason().asString())
        assertEquals(10L, whole.usage().get().completionTokens())
        val streamed = StringBuilder()
        var finish: String? = null
        client.completions().createStreaming(params.build()).use { s ->
            s.stream().forEach { chunk -> chunk.choices().forEach { c -> streamed.append(c.text()); c._finishReason().asKnown().getOrNull()?.let { finish = it.asString() } } }
        }
        assertEquals(choice.text(), streamed.toString())
        assertEquals("length", finish)
    }

    @Test
    fun `seeded sampling is reproducible across calls and differs across seeds`() {
        fun sample(seed: Long) = client.chat().completions().create(
            chat("Tell me something random").temperature(1.0).seed(seed).maxCompletionTokens(16).build(),
        ).choices().single().message().content().get()
        val a = sample(1234)
        assertEquals(a, sample(1234))
        assertNotEquals(a, sample(4321))
        fun complete(seed: Long) = client.completions().create(
            CompletionCreateParams.builder().model(model).prompt("Random:").temperature(0.9).seed(seed).maxTokens(12).build(),
        ).choices().single().text()
        assertEquals(complete(7), complete(7))
    }

    @Test
    fun `a stop string ends the text before it with finish_reason stop`() {
        val full = client.completions().create(
            CompletionCreateParams.builder().model(model).prompt("The stop test").maxTokens(24).build(),
        ).choices().single().text()
        assertTrue(full.length >= 12, "need some generated text, got '$full'")
        val stop = full.substring(full.length / 2, full.length / 2 + 3)
        val expected = full.substring(0, full.indexOf(stop))
        val stopped = client.completions().create(
            CompletionCreateParams.builder().model(model).prompt("The stop test").maxTokens(24).stop(stop).build(),
        ).choices().single()
        assertEquals(expected, stopped.text())
        assertEquals("stop", stopped.finishReason().asString())

        val chatFull = client.chat().completions().create(chat("Stop chat").maxCompletionTokens(24).build())
            .choices().single().message().content().get()
        val chatStop = chatFull.substring(chatFull.length / 2, chatFull.length / 2 + 3)
        val streamed = StringBuilder()
        var finish: String? = null
        client.chat().completions().createStreaming(
            chat("Stop chat").maxCompletionTokens(24).stopOfStrings(listOf("\u0000never", chatStop)).build(),
        ).use { s ->
            s.stream().forEach { ch -> ch.choices().forEach { c -> c.delta().content().getOrNull()?.let { streamed.append(it) }; c.finishReason().getOrNull()?.let { finish = it.asString() } } }
        }
        assertEquals(chatFull.substring(0, chatFull.indexOf(chatStop)), streamed.toString())
        assertEquals("stop", finish)
    }

    @Test
    fun `logprobs and top logprobs come back for every token`() {
        val r = client.chat().completions().create(chat("Logprobs please").maxCompletionTokens(8).logprobs(true).topLogprobs(3).build())
        val content = r.choices().single().logprobs().get().content().get()
        assertEquals(8, content.size)
        for (t in content) {
            assertTrue(t.logprob() <= 0.0)
            assertEquals(3, t.topLogprobs().size)
            // Greedy: the chosen token is the most likely one.
            assertEquals(t.topLogprobs()[0].logprob(), t.logprob(), 1e-6)
            assertEquals(t.topLogprobs()[0].token(), t.token())
            val lps = t.topLogprobs().map { it.logprob() }
            assertEquals(lps.sortedDescending(), lps)
        }
        val c = client.completions().create(
            CompletionCreateParams.builder().model(model).prompt("Logprobs").maxTokens(5).logprobs(2).build(),
        ).choices().single()
        val lp = c.logprobs().get()
        assertEquals(5, lp.tokens().get().size)
        assertEquals(5, lp.tokenLogprobs().get().size)
        assertEquals(5, lp.topLogprobs().get().size)
        // Tokens that split a UTF-8 character show U+FFFD alone; otherwise they spell the text.
        if (lp.tokens().get().none { it.contains('\uFFFD') }) assertEquals(c.text(), lp.tokens().get().joinToString(""))
    }

    @Test
    fun `n choices are distinct streams of one request`() {
        val r = client.chat().completions().create(chat("Two answers").n(2).temperature(1.0).seed(5).maxCompletionTokens(8).build())
        assertEquals(listOf(0L, 1L), r.choices().map { it.index() })
        assertEquals(16L, r.usage().get().completionTokens())
        assertNotEquals(r.choices()[0].message().content(), r.choices()[1].message().content())
    }

    @Test
    fun `the SDK sees errors typed`() {
        assertThrows(UnauthorizedException::class.java) {
            OpenAIOkHttpClient.builder().baseUrl(server.base + "/v1").apiKey("wrong").maxRetries(0).build()
                .chat().completions().create(chat("hi").maxCompletionTokens(2).build())
        }
        assertThrows(NotFoundException::class.java) {
            client.chat().completions().create(ChatCompletionCreateParams.builder().model("gpt-4o").addUserMessage("hi").build())
        }
        val e = assertThrows(BadRequestException::class.java) {
            client.chat().completions().create(chat("hi").temperature(3.0).build())
        }
        assertTrue(e.message!!.contains("temperature"), e.message)
    }
}
