package io.dbrx4j

import io.dbrx4j.internal.StreamingDecoder
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance

@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class TokenizerTest {
    private val tokenizer = Tokenizer.load(Fixtures.modelDir)
    private val cases = Fixtures.json("tokenizer_reference.json")["tokenizer_cases"].toList()

    @AfterAll
    fun close() = tokenizer.close()

    @Test
    fun `every tokenizer case encodes and decodes exactly`() {
        assertEquals(14, cases.size)
        for (c in cases) {
            val text = c["text"].asText()
            val ids = Fixtures.ints(c["ids"])
            assertArrayEquals(ids, tokenizer.encode(text), "encode ${quote(text)}")
            assertEquals(text, tokenizer.decode(ids), "decode ${ids.contentToString()}")
        }
    }

    @Test
    fun `special tokens map to DBRX ids`() {
        assertEquals(100257, tokenizer.tokenId("<|endoftext|>"))
        assertEquals(100278, tokenizer.tokenId("<|im_start|>"))
        assertEquals(100279, tokenizer.tokenId("<|im_end|>"))
        assertEquals(null, tokenizer.tokenId("hello world"))
        // Generated text leaves special tokens out.
        assertEquals("user\nhi", tokenizer.decode(intArrayOf(100278, 882, 198, 6151, 100279), true))
    }

    @Test
    fun `long texts are never truncated`() {
        val text = (0 until 3000).joinToString(" ") { "word$it" }
        val ids = tokenizer.encode(text)
        assertTrue(ids.size > 3000, "${ids.size} ids")
        assertEquals(text, tokenizer.decode(ids))
    }

    @Test
    fun `a closed tokenizer throws instead of touching freed memory`() {
        val t = Tokenizer.load(Fixtures.modelDir)
        t.close()
        t.close()
        org.junit.jupiter.api.assertThrows<DbrxClosedException> { t.encode("hi") }
        org.junit.jupiter.api.assertThrows<DbrxClosedException> { t.decode(intArrayOf(1)) }
    }

    @Test
    fun `streaming detokenisation never splits a UTF-8 character`() {
        for (c in cases) {
            val ids = Fixtures.ints(c["ids"])
            val decoder = StreamingDecoder(tokenizer)
            val pieces = ids.map { decoder.push(it) } + decoder.flush()
            for (p in pieces) assertFalse(p.contains('\uFFFD'), "piece ${quote(p)} of ${quote(c["text"].asText())}")
            assertEquals(tokenizer.decode(ids, true), pieces.joinToString(""))
        }
        // The rocket emoji is three tokens; its text comes out whole with the third.
        val decoder = StreamingDecoder(tokenizer)
        assertEquals(listOf("", "", "\uD83D\uDE80"), listOf(9468, 248, 222).map { decoder.push(it) })
    }
}
