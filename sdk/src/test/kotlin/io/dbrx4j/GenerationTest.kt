package io.dbrx4j

import kotlinx.coroutines.async
import kotlinx.coroutines.awaitAll
import kotlinx.coroutines.flow.collect
import kotlinx.coroutines.flow.take
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.util.concurrent.CancellationException
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit

/** Generation through JNI on the bundled tiny-dbrx-cl100k (CPU backend). */
class GenerationTest {
    private val model = Fixtures.model
    private val cases = Fixtures.json("reference.json")["cases"].toList()

    /** Ids that must agree: up to the first step whose reference margin is below the fp32 tolerance. */
    private fun comparable(case: com.fasterxml.jackson.databind.JsonNode): Int {
        val margins = case["greedy_margins"].map { it.asDouble() }
        return margins.indexOfFirst { it < 1e-2 }.let { if (it < 0) margins.size else it }
    }

    private fun greedy(n: Int) = SamplingOptions.builder().maxTokens(n).stopTokenIds(emptyList()).build()

    /** Waits until every KV block of finished or cancelled requests is back. */
    private fun awaitNoBlocksUsed() {
        val deadline = System.nanoTime() + 10_000_000_000L
        while (model.stats().let { it.blocksUsed != 0 || it.running != 0 }) {
            check(System.nanoTime() < deadline) { "KV blocks still in use: ${model.stats()}" }
            Thread.sleep(10)
        }
    }

    @Test
    fun `greedy ids match the reference`() {
        for (c in cases) {
            val expected = Fixtures.ints(c["greedy_ids"])
            val n = comparable(c)
            assertTrue(n >= 3, "case with too few comparable steps")
            val got = model.complete(Prompt.ids(Fixtures.ints(c["prompt_ids"])), greedy(expected.size))
            assertEquals(FinishReason.LENGTH, got.finishReason)
            assertEquals(expected.size, got.tokens.size)
            assertArrayEquals(expected.copyOf(n), got.tokenIds.copyOf(n), "prompt ${c["prompt_ids"]}")
        }
    }

    @Test
    fun `a batch-invariant model gives the same tokens and prompt logits`() {
        val c = cases.first()
        val prompt = Prompt.ids(Fixtures.ints(c["prompt_ids"]))
        val options = greedy(6).toBuilder().promptLogits(true).build()
        val plain = model.complete(prompt, options)
        Dbrx.load(Fixtures.modelDir, Fixtures.options.toBuilder().batchInvariant(true).build()).use { invariant ->
            val got = invariant.complete(prompt, options)
            assertArrayEquals(plain.tokenIds, got.tokenIds)
            assertArrayEquals(plain.promptLogits, got.promptLogits)  // the CPU backend: bitwise
        }
    }

    @Test
    fun `the three stream shapes give the same tokens`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[2]["prompt_ids"]))
        val options = greedy(12)
        val fromFlow = runBlocking { model.generate(prompt, options).toList() }.map { it.id }
        val fromIterator = model.stream(prompt, options).use { s -> s.asSequence().map { it.id }.toList() }
        val fromFuture = model.completeAsync(prompt, options).get(60, TimeUnit.SECONDS).tokenIds.toList()
        assertEquals(fromFlow, fromIterator)
        assertEquals(fromFlow, fromFuture)
        val text = model.complete(prompt, options)
        assertEquals(model.tokenizer!!.decode(text.tokenIds, true), text.text)
    }

    @Test
    fun `cancelling a Flow mid-stream returns the request's KV blocks`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[2]["prompt_ids"]))
        awaitNoBlocksUsed()
        val first = runBlocking { model.generate(prompt, greedy(1000)).take(3).toList() }
        assertEquals(3, first.size)
        awaitNoBlocksUsed()
        // Cancelled before its first token: the collector's job is cancelled right after it starts.
        runBlocking {
            val job = launch { model.generate(prompt, greedy(1000)).collect { } }
            job.cancel()
            job.join()
        }
        awaitNoBlocksUsed()
        assertEquals(0, model.stats().running)
    }

    @Test
    fun `closing a TokenStream early returns the request's KV blocks`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[1]["prompt_ids"]))
        awaitNoBlocksUsed()
        model.stream(prompt, greedy(1000)).use { s ->
            assertTrue(s.hasNext())
            s.next()
            assertTrue(model.stats().blocksUsed > 0, "a running request holds blocks")
        }
        awaitNoBlocksUsed()
        // Closed from another thread while the consumer waits.
        val s = model.stream(prompt, greedy(1000))
        val closer = Executors.newSingleThreadScheduledExecutor()
        closer.schedule(s::close, 100, TimeUnit.MILLISECONDS)
        var n = 0
        while (s.hasNext()) { s.next(); n++ }
        assertEquals(FinishReason.CANCELLED, s.finishReason())
        assertTrue(n < 1000)
        closer.shutdown()
        awaitNoBlocksUsed()
    }

    @Test
    fun `cancelling the CompletableFuture cancels the native request`() {
        awaitNoBlocksUsed()
        val future = model.completeAsync(Prompt.ids(Fixtures.ints(cases[0]["prompt_ids"])), greedy(1000))
        Thread.sleep(100)
        assertTrue(future.cancel(true))
        try { future.get() } catch (_: CancellationException) {}
        awaitNoBlocksUsed()
    }

    @Test
    fun `16 concurrent streams produce the same tokens as 16 sequential ones`() {
        val prompts = (0 until 16).map { Prompt.ids(Fixtures.ints(cases[it % cases.size]["prompt_ids"]) + intArrayOf(1000 + it)) }
        val options = greedy(10)
        val sequential = prompts.map { model.complete(it, options).tokenIds.toList() }
        // 8 from threads (TokenStream), 8 from coroutines (Flow), all at once on one engine.
        val pool = Executors.newFixedThreadPool(8)
        val threaded = (0 until 8).map { i -> pool.submit<List<Int>> { model.stream(prompts[i], options).use { s -> s.asSequence().map { it.id }.toList() } } }
        val flows = runBlocking {
            withTimeout(120_000) {
                (8 until 16).map { i -> async { model.generate(prompts[i], options).toList().map { it.id } } }.awaitAll()
            }
        }
        val concurrent = threaded.map { it.get(120, TimeUnit.SECONDS) } + flows
        pool.shutdown()
        assertEquals(sequential, concurrent)
        awaitNoBlocksUsed()
    }

    @Test
    fun `stop strings end the text before them`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[2]["prompt_ids"]))
        val full = model.complete(prompt, greedy(12))
        val text = full.text
        assertTrue(text.length > 4, "fixture generates text: ${quote(text)}")
        val stop = text.substring(text.length / 2, text.length / 2 + 2)
        val cut = model.complete(prompt, greedy(12).toBuilder().stop(stop).build())
        assertEquals(FinishReason.STOP, cut.finishReason)
        assertEquals(text.substring(0, text.indexOf(stop)), cut.text)
        awaitNoBlocksUsed()
    }

    @Test
    fun `logprobs and seeded sampling`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[1]["prompt_ids"]))
        val sampled = SamplingOptions.builder().temperature(0.8f).topP(0.95f).topK(50).seed(7).maxTokens(8)
            .topLogprobs(3).stopTokenIds(emptyList()).build()
        val a = model.complete(prompt, sampled)
        val b = model.complete(prompt, sampled)
        assertArrayEquals(a.tokenIds, b.tokenIds, "same seed, same tokens")
        for (t in a.tokens) {
            assertTrue(t.logprob <= 0f && !t.logprob.isNaN(), "logprob $t")
            assertEquals(3, t.topLogprobs.size)
        }
    }

    @Test
    fun `chat prompts render, run and stop on the chat's stop tokens`() {
        val c = model.complete(Prompt.chat(ChatMessage.user("What is 2+2?")), SamplingOptions.greedy(5))
        assertTrue(c.promptTokens > 100, "the default system prompt was included")
        assertTrue(c.tokens.size <= 5)
        assertTrue(model.defaultStopTokenIds.containsAll(listOf(100257, 100279)))
    }
}
