package io.dbrx4j

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertTrue
import kotlinx.coroutines.flow.collect
import kotlinx.coroutines.launch
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.assertThrows
import org.junit.jupiter.api.io.TempDir
import java.nio.file.Files
import java.nio.file.Path
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit

/** Loading, errors and closing: each test loads its own model. */
class LifecycleTest {
    private fun checkpointCopy(dir: Path): Path {
        Files.list(Fixtures.modelDir).use { files ->
            files.forEach { Files.createSymbolicLink(dir.resolve(it.fileName), it.toAbsolutePath()) }
        }
        return dir
    }

    @Test
    fun `a malformed checkpoint throws the typed exception`(@TempDir tmp: Path) {
        val dir = checkpointCopy(tmp)
        Files.delete(dir.resolve("config.json"))
        Files.writeString(dir.resolve("config.json"), "{\"model_type\": \"dbrx\", \"d_model\": ")
        val e = assertThrows<DbrxBadCheckpointException> { Dbrx.load(dir, Fixtures.options) }
        assertTrue(e.message!!.isNotEmpty(), "carries the native message")
        assertThrows<DbrxBadCheckpointException> { Dbrx.load(tmp.resolve("nowhere"), Fixtures.options) }
    }

    @Test
    fun `a truncated weight shard throws the typed exception`(@TempDir tmp: Path) {
        val dir = checkpointCopy(tmp)
        val shard = dir.resolve("model-00002-of-00002.safetensors")
        val bytes = Files.readAllBytes(shard)
        Files.delete(shard)
        Files.write(shard, bytes.copyOf(bytes.size / 2))
        val e = assertThrows<DbrxException> { Dbrx.load(dir, Fixtures.options) }
        assertTrue(e is DbrxBadCheckpointException, "got ${e::class.simpleName}: ${e.message}")
    }

    @Test
    fun `invalid sampling options throw the typed exception`() {
        Dbrx.load(Fixtures.modelDir, Fixtures.options).use { model ->
            assertThrows<DbrxInvalidArgumentException> {
                model.complete(Prompt.ids(intArrayOf(1, 2, 3)), SamplingOptions.builder().maxTokens(0).build())
            }
            assertThrows<DbrxInvalidArgumentException> {
                model.complete(Prompt.ids(intArrayOf(1, 2, 3)), SamplingOptions.builder().topP(2f).build())
            }
        }
    }

    @Test
    fun `load progress is reported up to 1`() {
        val seen = CopyOnWriteArrayList<Float>()
        val options = Fixtures.options.toBuilder().onProgress { seen.add(it) }.build()
        Dbrx.load(Fixtures.modelDir, options).use { model -> assertEquals(100352, model.info.vocabSize) }
        assertTrue(seen.isNotEmpty())
        assertEquals(1f, seen.last())
        assertEquals(seen.sorted(), seen.toList(), "monotonic")
    }

    @Test
    fun `a throwing progress listener aborts the load`() {
        val options = Fixtures.options.toBuilder().onProgress { throw IllegalStateException("stop loading") }.build()
        val e = assertThrows<IllegalStateException> { Dbrx.load(Fixtures.modelDir, options) }
        assertEquals("stop loading", e.message)
    }

    @Test
    fun `CUDA without a GPU is a clear error`() {
        if (Dbrx.cudaAvailable()) return
        val e = assertThrows<DbrxUnsupportedException> {
            Dbrx.load(Fixtures.modelDir, Fixtures.options.toBuilder().device(Device.CUDA).build())
        }
        assertTrue(e.message!!.contains("CUDA"))
    }

    @Test
    fun `cancelling before the first token cancels the waiting native request`() {
        // One running sequence at a time: a second request waits in the queue with no token yet.
        Dbrx.load(Fixtures.modelDir, Fixtures.options.toBuilder().maxRunning(1).build()).use { model ->
            val long = SamplingOptions.builder().maxTokens(1000).stopTokenIds(emptyList()).build()
            val running = model.stream(Prompt.ids(intArrayOf(1, 2, 3)), long)
            assertTrue(running.hasNext())
            val received = java.util.concurrent.atomic.AtomicInteger()
            kotlinx.coroutines.runBlocking {
                val job = launch(kotlinx.coroutines.Dispatchers.IO) {
                    model.generate(Prompt.ids(intArrayOf(4, 5, 6)), long).collect { received.incrementAndGet() }
                }
                awaitStats(model) { it.waiting == 1 }
                job.cancel()
                job.join()
            }
            awaitStats(model) { it.waiting == 0 }
            assertEquals(0, received.get(), "the cancelled request never produced a token")
            // The same for a TokenStream closed before its first token, and a cancelled future.
            val waiting = model.stream(Prompt.ids(intArrayOf(7, 8, 9)), long)
            awaitStats(model) { it.waiting == 1 }
            waiting.close()
            assertFalse(waiting.hasNext())
            val future = model.completeAsync(Prompt.ids(intArrayOf(10, 11)), long)
            awaitStats(model) { it.waiting == 1 }
            future.cancel(true)
            awaitStats(model) { it.waiting == 0 }
            running.close()
            awaitStats(model) { it.running == 0 && it.blocksUsed == 0 }
        }
    }

    private fun awaitStats(model: DbrxModel, condition: (EngineStats) -> Boolean) {
        val deadline = System.nanoTime() + 10_000_000_000L
        while (!condition(model.stats())) {
            check(System.nanoTime() < deadline) { "engine never reached the expected state: ${model.stats()}" }
            Thread.sleep(5)
        }
    }

    @Test
    fun `close is idempotent, thread-safe, and a closed handle throws`() {
        val model = Dbrx.load(Fixtures.modelDir, Fixtures.options)
        val stream = model.stream(Prompt.ids(intArrayOf(1, 2, 3)), SamplingOptions.builder().maxTokens(2000).stopTokenIds(emptyList()).build())
        assertTrue(stream.hasNext())
        val pool = Executors.newFixedThreadPool(4)
        repeat(4) { pool.submit(model::close) }
        pool.shutdown()
        assertTrue(pool.awaitTermination(30, TimeUnit.SECONDS))
        model.close()
        assertTrue(model.isClosed)
        // The stream that was running either ends or reports the closed model, never crashes.
        val outcome = runCatching { while (stream.hasNext()) stream.next() }
        outcome.exceptionOrNull()?.let { assertTrue(it is DbrxClosedException, "got $it") }
        stream.close()
        assertThrows<DbrxClosedException> { model.complete(Prompt.ids(intArrayOf(1, 2, 3))) }
        assertThrows<DbrxClosedException> { model.stats() }
        assertThrows<DbrxClosedException> { model.stream(Prompt.ids(intArrayOf(1))) }
        assertFalse(runCatching { model.completeAsync(Prompt.ids(intArrayOf(1))).get() }.isSuccess)
    }
}
