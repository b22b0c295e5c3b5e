package io.dbrx4j

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.util.concurrent.TimeUnit
import kotlin.math.abs

/** SamplingOptions.promptLogits: the last prompt position's logits against the float64 reference. */
class PromptLogitsTest {
    private val model = Fixtures.model
    private val cases = Fixtures.json("reference.json")["cases"].toList()

    private fun options(n: Int, logits: Boolean = true) =
        SamplingOptions.builder().maxTokens(n).stopTokenIds(emptyList()).promptLogits(logits).build()

    private fun maxAbsDiff(a: FloatArray, b: FloatArray): Double {
        assertEquals(a.size, b.size, "logit vector lengths")
        return a.indices.maxOf { abs(a[it].toDouble() - b[it].toDouble()) }
    }

    private fun argmax(v: FloatArray): Int = v.indices.maxBy { v[it] }

    @Test
    fun `prompt logits of every reference case match reference safetensors`() {
        assertEquals(3, cases.size)
        for ((i, c) in cases.withIndex()) {
            val expected = Fixtures.f32Tensor("reference.safetensors", "case$i.last_logits")
            assertEquals(model.info.vocabSize, expected.size)
            val got = model.complete(Prompt.ids(Fixtures.ints(c["prompt_ids"])), options(c["greedy_ids"].size()))
            val logits = got.promptLogits
            assertNotNull(logits, "case $i: promptLogits requested but null")
            logits!!
            val diff = maxAbsDiff(expected, logits)
            assertTrue(diff <= 2e-3, "case $i: max |logit - reference| = $diff > 2e-3")
            // The first greedy token is the argmax of these logits.
            assertEquals(argmax(logits), got.tokenIds[0], "case $i")
        }
    }

    @Test
    fun `prompt logits are null unless asked for`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[0]["prompt_ids"]))
        assertNull(model.complete(prompt, options(2, logits = false)).promptLogits)
        model.stream(prompt, options(2, logits = false)).use { s ->
            s.next()
            assertNull(s.promptLogits())
        }
    }

    @Test
    fun `the stream, the future and the blocking call give the same prompt logits`() {
        val prompt = Prompt.ids(Fixtures.ints(cases[1]["prompt_ids"]))
        val blocking = model.complete(prompt, options(4)).promptLogits!!
        val future = model.completeAsync(prompt, options(4)).get(60, TimeUnit.SECONDS).promptLogits!!
        // Closed after one token: the logits were read before the native request was released.
        val streamed = model.stream(prompt, options(1000)).use { s ->
            s.next()
            s.promptLogits()
        }
        assertNotNull(streamed)
        assertTrue(maxAbsDiff(blocking, future) <= 1e-5, "future vs blocking")
        assertTrue(maxAbsDiff(blocking, streamed!!) <= 1e-5, "stream vs blocking")
        // A copy per call: the caller cannot change the Completion's logits.
        val completion = model.complete(prompt, options(1))
        completion.promptLogits!![0] = Float.NaN
        assertTrue(!completion.promptLogits!![0].isNaN())
    }
}
