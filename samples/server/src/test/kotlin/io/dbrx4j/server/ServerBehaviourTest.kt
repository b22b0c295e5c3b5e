package io.dbrx4j.server

import io.dbrx4j.Device
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.net.Socket
import java.nio.file.Paths

/** Slow readers, /metrics, and configuration by flags and environment. */
class ServerBehaviourTest {
    private val server = TestServer.shared

    @Test
    fun `a reader that never reads blocks nobody, and hanging up frees its KV blocks`() {
        val body = """{"model":"tiny-dbrx-cl100k","prompt":"never read","max_tokens":1500,"stream":true}"""
        Socket("127.0.0.1", server.port).use { slow ->
            slow.receiveBufferSize = 4096
            val bytes = body.toByteArray()
            slow.getOutputStream().write(
                ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TestServer.KEY}\r\n" +
                    "Content-Type: application/json\r\nContent-Length: ${bytes.size}\r\n\r\n").toByteArray() + bytes,
            )
            while (server.server.admission.running == 0) Thread.sleep(5)
            // Others go on while the slow stream is parked.
            val t0 = System.nanoTime()
            repeat(3) {
                val r = server.json(Endpoint.COMPLETIONS.path, """{"model":"tiny-dbrx-cl100k","prompt":"meanwhile $it","max_tokens":8}""")
                assertEquals(8, r.get("usage").get("completion_tokens").asInt())
            }
            assertTrue((System.nanoTime() - t0) / 1e9 < 60, "requests waited on the slow reader")
            assertEquals(1, server.server.admission.running, "the slow stream still holds its slot")
            slow.setSoLinger(true, 0)
        }
        val deadline = System.nanoTime() + 60_000_000_000L
        while (System.nanoTime() < deadline) {
            val s = server.host.stats()!!
            if (s.running == 0 && s.blocksUsed == 0 && server.server.admission.running == 0) return
            Thread.sleep(50)
        }
        throw AssertionError("the hung-up slow stream was not cancelled: ${server.host.stats()}")
    }

    @Test
    fun `a client that hangs up on a non-streamed request cancels it`() {
        val body = """{"model":"tiny-dbrx-cl100k","prompt":"hang up","max_tokens":1900}""".toByteArray()
        val before = server.host.stats()!!.generatedTokens
        Socket("127.0.0.1", server.port).use { socket ->
            socket.getOutputStream().write(
                ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TestServer.KEY}\r\n" +
                    "Content-Type: application/json\r\nContent-Length: ${body.size}\r\n\r\n").toByteArray() + body,
            )
            while (server.host.stats()!!.running == 0) Thread.sleep(5)
            socket.setSoLinger(true, 0)
        }
        val deadline = System.nanoTime() + 60_000_000_000L
        while (server.server.admission.running != 0 && System.nanoTime() < deadline) Thread.sleep(20)
        val stats = server.host.stats()!!
        assertEquals(0, server.server.admission.running)
        assertEquals(0, stats.blocksUsed, "$stats")
        assertTrue(stats.generatedTokens - before < 1900, "the request ran to the end: $stats")
    }

    @Test
    fun `metrics are Prometheus text with the serving and engine series`() {
        server.events(Endpoint.CHAT.path, """{"model":"tiny-dbrx-cl100k","messages":[{"role":"user","content":"m"}],"max_tokens":4,"stream":true}""")
        val r = server.send("/metrics")
        assertEquals(200, r.statusCode())
        assertTrue(r.headers().firstValue("Content-Type").get().startsWith("text/plain"))
        val lines = r.body().lines().filter { it.isNotBlank() }
        for (name in listOf(
            "dbrx_requests_total", "dbrx_prompt_tokens_total", "dbrx_generation_tokens_total", "dbrx_time_to_first_token_seconds",
            "dbrx_inter_token_latency_seconds", "dbrx_request_duration_seconds", "dbrx_queue_depth", "dbrx_requests_running",
            "dbrx_kv_blocks_used", "dbrx_kv_blocks_cached", "dbrx_kv_blocks_total", "dbrx_preemptions_total", "dbrx_engine_running",
        )) {
            assertTrue(lines.any { it.startsWith("# TYPE $name ") }, "no TYPE line for $name")
        }
        val sample = Regex("""^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.eE+-]+$""")
        for (l in lines.filter { !it.startsWith("#") }) assertTrue(sample.matches(l), "not a Prometheus sample: $l")
        fun value(prefix: String) = lines.first { it.startsWith(prefix) }.substringAfterLast(' ').toDouble()
        assertTrue(value("dbrx_time_to_first_token_seconds_count") >= 1)
        assertTrue(value("dbrx_inter_token_latency_seconds_count") >= 3)
        assertTrue(value("dbrx_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}") >= 1)
        val buckets = lines.filter { it.startsWith("dbrx_inter_token_latency_seconds_bucket") }.map { it.substringAfterLast(' ').toDouble() }
        assertEquals(buckets.sorted(), buckets, "buckets are cumulative")
        assertEquals(value("dbrx_inter_token_latency_seconds_count"), buckets.last())
    }

    @Test
    fun `configuration comes from flags over the environment`() {
        val env = mapOf("DBRX_MODEL_DIR" to "/env/model", "DBRX_PORT" to "1234", "DBRX_API_KEY" to "env-key", "DBRX_DEVICE" to "CUDA")
        val c = ServerConfig.parse(arrayOf("--port=9000", "--max-body-bytes", "2m", "--max-n", "3", "--kv-cache-bytes", "1g"), env)
        assertEquals(Paths.get("/env/model"), c.modelDir)
        assertEquals("model", c.modelName)
        assertEquals(9000, c.port)
        assertEquals("env-key", c.apiKey)
        assertEquals(Device.CUDA, c.device)
        assertEquals(2L shl 20, c.maxBodyBytes)
        assertEquals(1L shl 30, c.kvCacheBytes)
        assertEquals(3, c.maxN)
        assertEquals(1L shl 30, c.loadOptions().kvCacheBytes)
        assertEquals(null, c.loadOptions().maxRunning)
        assertEquals(7, ServerConfig.parse(arrayOf("--engine-max-running", "7"), env).loadOptions().maxRunning)
        val unknown = assertThrows(IllegalArgumentException::class.java) { ServerConfig.parse(arrayOf("--model-dir", "m", "--bogus", "1"), emptyMap()) }
        assertTrue(unknown.message!!.contains("--bogus"))
        val bad = assertThrows(IllegalArgumentException::class.java) { ServerConfig.parse(arrayOf("--model-dir", "m", "--port", "eighty"), emptyMap()) }
        assertTrue(bad.message!!.contains("--port"))
        assertThrows(IllegalArgumentException::class.java) { ServerConfig.parse(arrayOf("--port", "80"), emptyMap()) }
    }
}
