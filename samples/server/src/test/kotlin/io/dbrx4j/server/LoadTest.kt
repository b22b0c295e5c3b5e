package io.dbrx4j.server

import com.fasterxml.jackson.databind.JsonNode
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.Test
import java.net.Socket
import java.net.http.HttpResponse
import java.util.Collections
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger
import kotlin.random.Random

/**
 * A bounded loopback load test: [REQUESTS] streaming requests, [CONCURRENCY] at a time, a third of the
 * clients hanging up at a random point. Every surviving stream must be exactly the greedy answer, every
 * hang-up must be seen as a disconnect, and the engine must end with nothing running and no KV block in
 * use. Prints throughput and latency percentiles. Skipped with -Ddbrx.server.loadtest=false.
 */
class LoadTest {
    private class Outcome(val ttftMs: Double, val totalMs: Double, val tokens: Int)

    private val prompts = listOf(
        "The capital of France is", "def fibonacci(n):", "Once upon a time", "SELECT * FROM", "The mixture of experts",
        "In 1969, the first", "import numpy as np", "Dear Sir or Madam,", "The quick brown fox", "A haiku about rain:",
    )

    private fun body(prompt: String, maxTokens: Int) = TestServer.MAPPER.writeValueAsString(
        mapOf("model" to "tiny-dbrx-cl100k", "prompt" to prompt, "max_tokens" to maxTokens, "stream" to true, "stream_options" to mapOf("include_usage" to true)),
    )

    @Test
    fun `500 streams, 64 at a time, a third hanging up, end correct with the engine drained`() {
        assumeTrue(System.getProperty("dbrx.server.loadtest", "true").toBoolean(), "load test disabled")
        TestServer(TestServer.config().copy(maxConcurrent = CONCURRENCY, maxQueue = REQUESTS)).use { s ->
            s.awaitReady()
            // The greedy answer of each prompt, alone; batching must not change it.
            val reference = prompts.associateWith { p ->
                val r = s.json(Endpoint.COMPLETIONS.path, body(p, MAX_TOKENS).replace(""","stream":true,"stream_options":{"include_usage":true}""", ""))
                val c = r.get("choices")[0]
                Triple(c.get("text").asText(), c.get("finish_reason").asText(), r.get("usage").get("completion_tokens").asInt())
            }
            val rng = Random(20261129)
            val plan = List(REQUESTS) { i -> Triple(prompts[i % prompts.size], rng.nextInt(3) == 0, 1 + rng.nextInt(12)) }
            val hangUps = plan.count { it.second }
            val outcomes = Collections.synchronizedList(ArrayList<Outcome>())
            val failures = Collections.synchronizedList(ArrayList<String>())
            val next = AtomicInteger()
            val pool = Executors.newFixedThreadPool(CONCURRENCY)
            val start = System.nanoTime()
            repeat(CONCURRENCY) {
                pool.execute {
                    while (true) {
                        val i = next.getAndIncrement()
                        if (i >= plan.size) break
                        val (prompt, hangUp, after) = plan[i]
                        try {
                            if (hangUp) hangUpAfter(s, body(prompt, HANG_UP_MAX_TOKENS), after)
                            else outcomes.add(survive(s, prompt, reference.getValue(prompt)))
                        } catch (t: Throwable) {
                            failures.add("request $i ($prompt, hangUp=$hangUp): $t")
                        }
                    }
                }
            }
            pool.shutdown()
            assertTrue(pool.awaitTermination(10, TimeUnit.MINUTES), "the load test did not finish")
            val wallS = (System.nanoTime() - start) / 1e9
            assertEquals(emptyList<String>(), failures.take(10))
            assertEquals(REQUESTS - hangUps, outcomes.size)

            // The engine drains: no running or waiting sequence, no referenced KV block (cached prefixes may stay).
            val deadline = System.nanoTime() + 30_000_000_000L
            var stats = s.host.stats()!!
            while ((stats.running != 0 || stats.waiting != 0 || stats.blocksUsed != 0 || s.server.admission.running != 0) &&
                System.nanoTime() < deadline
            ) {
                Thread.sleep(50)
                stats = s.host.stats()!!
            }
            assertEquals(0, stats.running, "$stats")
            assertEquals(0, stats.waiting, "$stats")
            assertEquals(0, stats.blocksUsed, "$stats")
            assertEquals(0, s.server.admission.running)
            val metrics = s.send("/metrics").body()
            val disconnects = metrics.lines().first { it.startsWith("dbrx_client_disconnects_total ") }.substringAfter(' ').toLong()
            assertEquals(hangUps.toLong(), disconnects, "every hang-up cancels its request")

            report(wallS, hangUps, outcomes, stats.preemptions, metrics)
        }
    }

    /** Reads the whole stream and checks it against the greedy reference. */
    private fun survive(s: TestServer, prompt: String, ref: Triple<String, String, Int>): Outcome {
        val t0 = System.nanoTime()
        var ttft = -1.0
        val r = TestServer.HTTP.send(s.request(Endpoint.COMPLETIONS.path, body(prompt, MAX_TOKENS)), HttpResponse.BodyHandlers.ofLines())
        check(r.statusCode() == 200) { "status ${r.statusCode()}" }
        val events = ArrayList<String>()
        r.body().use { lines ->
            lines.filter { it.startsWith("data: ") }.forEach {
                if (ttft < 0) ttft = (System.nanoTime() - t0) / 1e6
                events.add(it.removePrefix("data: "))
            }
        }
        val total = (System.nanoTime() - t0) / 1e6
        check(events.lastOrNull() == "[DONE]") { "no [DONE]: ${events.takeLast(2)}" }
        val chunks: List<JsonNode> = events.dropLast(1).map { TestServer.MAPPER.readTree(it) }
        check(chunks.map { it.get("id").asText() }.toSet().size == 1) { "chunk ids differ" }
        val choices = chunks.flatMap { it.get("choices").toList() }
        val text = choices.joinToString("") { it.get("text").asText() }
        check(text == ref.first) { "text differs from the greedy reference: '$text' vs '${ref.first}'" }
        val finishes = choices.mapNotNull { c -> c.get("finish_reason").takeUnless { it.isNull }?.asText() }
        check(finishes == listOf(ref.second) && choices.last().get("finish_reason").asText() == ref.second) { "finish reasons $finishes" }
        val usage = chunks.last().get("usage")
        check(usage.get("completion_tokens").asInt() == ref.third) { "usage $usage" }
        return Outcome(ttft, total, ref.third)
    }

    /** Sends the request on a raw socket, reads [events] events, then resets the connection. */
    private fun hangUpAfter(s: TestServer, body: String, events: Int) {
        Socket("127.0.0.1", s.port).use { socket ->
            val bytes = body.toByteArray()
            val head = "POST ${Endpoint.COMPLETIONS.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${TestServer.KEY}\r\n" +
                "Content-Type: application/json\r\nContent-Length: ${bytes.size}\r\n\r\n"
            socket.getOutputStream().apply { write(head.toByteArray()); write(bytes); flush() }
            val input = socket.getInputStream()
            val seen = StringBuilder()
            val buf = ByteArray(4096)
            while (Regex("data: ").findAll(seen).count() < events) {
                val n = input.read(buf)
                check(n > 0) { "the stream ended before $events events: $seen" }
                seen.append(String(buf, 0, n, Charsets.UTF_8))
            }
            check(seen.startsWith("HTTP/1.1 200")) { seen.take(200).toString() }
            socket.setSoLinger(true, 0) // an abrupt reset, as a crashed or impatient client would
        }
    }

    private fun report(wallS: Double, hangUps: Int, outcomes: List<Outcome>, preemptions: Long, metrics: String) {
        fun pct(values: List<Double>, p: Double): Double = values.sorted().let { it[((it.size - 1) * p).toInt()] }
        val ttft = outcomes.map { it.ttftMs }
        val total = outcomes.map { it.totalMs }
        val itl = outcomes.filter { it.tokens > 1 }.map { (it.totalMs - it.ttftMs) / (it.tokens - 1) }
        val tokens = outcomes.sumOf { it.tokens }
        val engineTokens = metrics.lines().first { it.startsWith("dbrx_engine_generated_tokens_total ") }.substringAfter(' ').toLong()
        println(
            """
            |LOAD TEST: $REQUESTS streaming /v1/completions requests, $CONCURRENCY concurrent, $hangUps hung up, ${outcomes.size} completed correctly
            |  wall ${"%.2f".format(wallS)} s; ${"%.1f".format(REQUESTS / wallS)} req/s; delivered ${"%.0f".format(tokens / wallS)} tok/s to survivors; engine generated $engineTokens tokens (${"%.0f".format(engineTokens / wallS)} tok/s)
            |  TTFT ms       p50 ${"%.1f".format(pct(ttft, .5))}  p90 ${"%.1f".format(pct(ttft, .9))}  p99 ${"%.1f".format(pct(ttft, .99))}
            |  latency ms    p50 ${"%.1f".format(pct(total, .5))}  p90 ${"%.1f".format(pct(total, .9))}  p99 ${"%.1f".format(pct(total, .99))}
            |  ITL ms/token  p50 ${"%.2f".format(pct(itl, .5))}  p90 ${"%.2f".format(pct(itl, .9))}  p99 ${"%.2f".format(pct(itl, .99))}
            |  preemptions $preemptions; engine drained (0 running, 0 waiting, 0 KV blocks in use)
            """.trimMargin(),
        )
    }

    private companion object {
        const val REQUESTS = 500
        const val CONCURRENCY = 64
        const val MAX_TOKENS = 16
        /** Long enough that every hang-up lands mid-generation. */
        const val HANG_UP_MAX_TOKENS = 256
    }
}
