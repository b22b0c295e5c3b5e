package io.dbrx4j.server

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.util.concurrent.CountDownLatch

/** /health and generation answer 503 while the model loads, after a failed load, and once the engine is dead. */
class LifecycleTest {
    private val body = """{"model":"tiny-dbrx-cl100k","prompt":"hi","max_tokens":2}"""

    private fun errorCode(r: java.net.http.HttpResponse<String>) = TestServer.MAPPER.readTree(r.body()).get("error").get("code").asText()

    @Test
    fun `503 while loading, 200 when ready, 503 after the engine dies`() {
        val release = CountDownLatch(1)
        TestServer(TestServer.config()) { release.await(); TestServer.load() }.use { s ->
            val loading = s.send("/health", auth = null)
            assertEquals(503, loading.statusCode())
            assertTrue(loading.body().contains("loading"), loading.body())
            val refused = s.send(Endpoint.COMPLETIONS.path, body)
            assertEquals(503, refused.statusCode())
            assertEquals("model_loading", errorCode(refused))

            release.countDown()
            s.awaitReady()
            assertEquals(200, s.send("/health", auth = null).statusCode())
            assertEquals(200, s.send(Endpoint.COMPLETIONS.path, body).statusCode())

            // The engine goes away under a running stream: the stream ends with an error event, no [DONE].
            val long = """{"model":"tiny-dbrx-cl100k","prompt":"dying","max_tokens":1800,"stream":true}"""
            val r = TestServer.HTTP.send(s.request(Endpoint.COMPLETIONS.path, long), java.net.http.HttpResponse.BodyHandlers.ofLines())
            val events = r.body().use { lines ->
                val it = lines.filter { l -> l.startsWith("data: ") }.map { l -> l.removePrefix("data: ") }.iterator()
                val first = it.next()
                s.host.model!!.close()
                listOf(first) + it.asSequence().toList()
            }
            assertTrue(events.last() != "[DONE]", "a stream cut by engine death must not end with [DONE]")
            val error = TestServer.MAPPER.readTree(events.last()).get("error")
            assertEquals("engine_dead", error.get("code").asText(), events.last())

            // Everything but /metrics answers 503 from then on.
            val dead = s.send(Endpoint.COMPLETIONS.path, body)
            assertEquals(503, dead.statusCode(), dead.body())
            assertEquals("engine_dead", errorCode(dead))
            assertEquals(503, s.send("/health", auth = null).statusCode())
            assertEquals(200, s.send("/metrics").statusCode())
        }
    }

    @Test
    fun `a failed load is reported by health and by every generation request`() {
        TestServer(TestServer.config()) { throw IllegalStateException("disk on fire") }.use { s ->
            while (s.host.state == ModelHost.State.LOADING) Thread.sleep(10)
            val h = s.send("/health", auth = null)
            assertEquals(503, h.statusCode())
            assertTrue(h.body().contains("disk on fire"), h.body())
            val r = s.send(Endpoint.CHAT.path, """{"model":"tiny-dbrx-cl100k","messages":[{"role":"user","content":"hi"}]}""")
            assertEquals(503, r.statusCode())
            assertEquals("engine_dead", errorCode(r))
        }
    }

    @Test
    fun `the engine's own queue limit answers 429 and leaves nothing behind`() {
        // One running and one waiting sequence at most: the third choice of a request cannot be queued.
        val config = TestServer.config().copy(engineMaxRunning = 1, engineMaxWaiting = 1)
        TestServer(config).use { s ->
            s.awaitReady()
            val r = s.send(Endpoint.COMPLETIONS.path, """{"model":"tiny-dbrx-cl100k","prompt":"full","max_tokens":1000,"n":3}""")
            assertEquals(429, r.statusCode(), r.body())
            assertEquals("queue_full", errorCode(r))
            val deadline = System.nanoTime() + 30_000_000_000L
            while (s.host.stats()!!.let { it.running + it.waiting + it.blocksUsed } != 0 && System.nanoTime() < deadline) Thread.sleep(20)
            val stats = s.host.stats()!!
            assertEquals(0, stats.running + stats.waiting + stats.blocksUsed, "$stats")
            assertEquals(200, s.send(Endpoint.COMPLETIONS.path, body).statusCode())
        }
    }
}
