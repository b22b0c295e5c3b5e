package io.dbrx4j

import io.dbrx4j.internal.NativeToken
import io.dbrx4j.internal.TokenAssembler
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance

/** Stop strings and text release, on the real tokenizer: "Hello" "," " World" "!" = 9906 11 4435 0. */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class TokenAssemblerTest {
    private val tokenizer = Tokenizer.load(Fixtures.modelDir)
    private val hello = intArrayOf(9906, 11, 4435, 0)

    @AfterAll
    fun close() = tokenizer.close()

    private fun run(ids: IntArray, stops: List<String>): Pair<List<List<Token>>, TokenAssembler> {
        val a = TokenAssembler(tokenizer, stops)
        val steps = ArrayList<List<Token>>()
        for (id in ids) {
            if (a.stopped) break
            steps.add(a.accept(NativeToken(id, Float.NaN, IntArray(0), FloatArray(0))))
        }
        steps.add(a.finish())
        return steps to a
    }

    @Test
    fun `without stop strings each token is released with its own text`() {
        val (steps, _) = run(hello, emptyList())
        assertEquals(listOf("Hello", ",", " World", "!"), steps.flatten().map { it.text })
        assertEquals(listOf(1, 1, 1, 1, 0), steps.map { it.size })
    }

    @Test
    fun `a stop string spanning tokens ends the text before it`() {
        val (steps, a) = run(hello, listOf(", W"))
        assertTrue(a.stopped)
        val tokens = steps.flatten()
        assertEquals("Hello", tokens.joinToString("") { it.text })
        assertEquals(listOf(9906, 11, 4435), tokens.map { it.id })
    }

    @Test
    fun `text that may begin a stop string is held, then released at the end`() {
        val (steps, a) = run(hello, listOf("World!!"))
        assertTrue(!a.stopped)
        assertEquals("Hello, World!", steps.flatten().joinToString("") { it.text })
        // "World" then "World!" could still grow into "World!!": that text waits for the end, and the
        // token holding it stays pending so the last token can carry it.
        assertEquals(listOf(1, 1, 0, 1, 1), steps.map { it.size })
        assertEquals(listOf(" "), steps[3].map { it.text })
        assertEquals(listOf("World!"), steps.last().map { it.text })
    }

    @Test
    fun `the earliest of several stop strings wins`() {
        val (steps, _) = run(hello, listOf("!", "lo,"))
        assertEquals("Hel", steps.flatten().joinToString("") { it.text })
    }
}
