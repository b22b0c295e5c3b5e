package io.dbrx4j.server

import dev.langchain4j.data.message.SystemMessage
import dev.langchain4j.data.message.UserMessage
import dev.langchain4j.model.chat.request.ChatRequest
import dev.langchain4j.model.chat.response.ChatResponse
import dev.langchain4j.model.chat.response.StreamingChatResponseHandler
import dev.langchain4j.model.language.StreamingLanguageModel
import dev.langchain4j.model.openai.OpenAiChatModel
import dev.langchain4j.model.openai.OpenAiLanguageModel
import dev.langchain4j.model.openai.OpenAiStreamingChatModel
import dev.langchain4j.model.openai.OpenAiStreamingLanguageModel
import dev.langchain4j.model.output.FinishReason
import dev.langchain4j.model.output.Response
import dev.langchain4j.model.StreamingResponseHandler
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.time.Duration
import java.util.concurrent.CompletableFuture
import java.util.concurrent.TimeUnit

/** LangChain4j's OpenAI module against the real server. */
class LangChain4jTest {
    private val server = TestServer.shared
    private val base = server.base + "/v1"
    private val name = "tiny-dbrx-cl100k"

    @Test
    fun `chat model, blocking and streaming, agree`() {
        val chat = OpenAiChatModel.builder().baseUrl(base).apiKey(TestServer.KEY).modelName(name)
            .temperature(0.0).maxTokens(10).timeout(Duration.ofSeconds(60)).build()
        val request = ChatRequest.builder().messages(SystemMessage.from("Be brief."), UserMessage.from("Hi LangChain4j")).build()
        val r = chat.chat(request)
        assertEquals(FinishReason.LENGTH, r.finishReason())
        assertEquals(10, r.tokenUsage().outputTokenCount())
        assertTrue(r.tokenUsage().inputTokenCount() > 5)

        val streaming = OpenAiStreamingChatModel.builder().baseUrl(base).apiKey(TestServer.KEY).modelName(name)
            .temperature(0.0).maxTokens(10).timeout(Duration.ofSeconds(60)).build()
        val done = CompletableFuture<ChatResponse>()
        val partial = StringBuilder()
        streaming.chat(request, object : StreamingChatResponseHandler {
            override fun onPartialResponse(text: String) { partial.append(text) }
            override fun onCompleteResponse(response: ChatResponse) { done.complete(response) }
            override fun onError(error: Throwable) { done.completeExceptionally(error) }
        })
        val s = done.get(60, TimeUnit.SECONDS)
        assertEquals(r.aiMessage().text(), partial.toString())
        assertEquals(r.aiMessage().text(), s.aiMessage().text())
        assertEquals(FinishReason.LENGTH, s.finishReason())
        assertEquals(10, s.tokenUsage().outputTokenCount())
    }

    @Test
    fun `seeded chat sampling is reproducible, and stop strings stop`() {
        fun model(seed: Int, stop: List<String> = emptyList()) = OpenAiChatModel.builder().baseUrl(base).apiKey(TestServer.KEY)
            .modelName(name).temperature(1.0).seed(seed).maxTokens(16).stop(stop).build()
        val a = model(99).chat("Surprise me")
        assertEquals(a, model(99).chat("Surprise me"))
        val cut = a.substring(a.length / 2, a.length / 2 + 2)
        val stopped = model(99, listOf(cut)).chat(ChatRequest.builder().messages(UserMessage.from("Surprise me")).build())
        assertEquals(a.substring(0, a.indexOf(cut)), stopped.aiMessage().text())
        assertEquals(FinishReason.STOP, stopped.finishReason())
    }

    @Test
    fun `language model (completions), blocking and streaming`() {
        val lm = OpenAiLanguageModel.builder().baseUrl(base).apiKey(TestServer.KEY).modelName(name).temperature(0.0).build()
        val r = lm.generate("Completion via LangChain4j")
        // OpenAI's default for completions is 16 tokens.
        assertEquals(16, r.tokenUsage()!!.outputTokenCount())
        assertEquals(FinishReason.LENGTH, r.finishReason())

        val slm: StreamingLanguageModel = OpenAiStreamingLanguageModel.builder().baseUrl(base).apiKey(TestServer.KEY)
            .modelName(name).temperature(0.0).build()
        val done = CompletableFuture<Response<String>>()
        val partial = StringBuilder()
        slm.generate("Completion via LangChain4j", object : StreamingResponseHandler<String> {
            override fun onNext(token: String) { partial.append(token) }
            override fun onComplete(response: Response<String>) { done.complete(response) }
            override fun onError(error: Throwable) { done.completeExceptionally(error) }
        })
        val s = done.get(60, TimeUnit.SECONDS)
        assertEquals(r.content(), partial.toString())
        assertEquals(r.content(), s.content())
    }
}
