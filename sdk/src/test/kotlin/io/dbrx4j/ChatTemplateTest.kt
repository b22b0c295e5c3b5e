package io.dbrx4j

import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.assertThrows
import java.time.Duration

class ChatTemplateTest {
    private val template = ChatTemplate.load(Fixtures.modelDir)

    @Test
    fun `every chat case renders exactly and encodes to its ids`() {
        val cases = Fixtures.json("tokenizer_reference.json")["chat_cases"].toList()
        assertEquals(4, cases.size)
        Tokenizer.load(Fixtures.modelDir).use { tokenizer ->
            for (c in cases) {
                val messages = c["messages"].map { ChatMessage(it["role"].asText(), it["content"].asText()) }
                val rendered = template.render(messages, c["add_generation_prompt"].asBoolean())
                assertEquals(c["rendered"].asText(), rendered, "render $messages")
                assertArrayEquals(Fixtures.ints(c["ids"]), tokenizer.encode(rendered), "ids of $messages")
            }
        }
    }

    @Test
    fun `DBRX's default system prompt is used when none is given`() {
        val text = template.render(listOf(ChatMessage.user("hi")))
        assertTrue(text.startsWith("<|im_start|>system\nYou are DBRX, created by Databricks."), text)
        assertTrue(text.endsWith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), text)
    }

    @Test
    fun `not binds looser than comparisons, as in Jinja2`() {
        fun r(src: String) = ChatTemplate.of(src).render(emptyList())
        assertEquals("yes", r("{% if not 'x' in 'abc' %}yes{% else %}no{% endif %}"))
        assertEquals("no", r("{% if not 'a' in 'abc' %}yes{% else %}no{% endif %}"))
        assertEquals("yes", r("{% if not 1 == 2 %}yes{% else %}no{% endif %}"))
        assertEquals("yes", r("{% if not 'a' in 'abc' or not 3 > 4 %}yes{% else %}no{% endif %}"))
        assertEquals("no", r("{% if not 'a' in 'abc' and not 3 > 4 %}yes{% else %}no{% endif %}"))
        assertEquals("yes", r("{% if 'x' not in 'abc' and not false %}yes{% else %}no{% endif %}"))
        assertEquals("yes", r("{% if not not true %}yes{% else %}no{% endif %}"))
    }

    @Test
    fun `templates cannot read files`() {
        val e = assertThrows<DbrxTemplateException> {
            ChatTemplate.of("{% include '/etc/passwd' %}").render(emptyList())
        }
        assertTrue(e.message!!.isNotEmpty())
        assertThrows<DbrxTemplateException> { ChatTemplate.of("{% import '/etc/hosts' as h %}x").render(emptyList()) }
    }

    @Test
    fun `templates see no Java objects`() {
        for (src in listOf("{{ messages[0].getClass() }}", "{{ messages.getClass().forName('java.lang.Runtime') }}", "{{ ''.class }}")) {
            // Refused outright, or rendered as nothing: never a Java object.
            val out = runCatching { ChatTemplate.of(src).render(listOf(ChatMessage.user("hi"))) }
            out.exceptionOrNull()?.let { assertTrue(it is DbrxTemplateException, "$src: $it") }
            out.getOrNull()?.let { assertTrue(!it.contains("class") && !it.contains("Runtime"), "$src: $it") }
        }
    }

    @Test
    fun `raise_exception rejects the conversation`() {
        val e = assertThrows<DbrxTemplateException> {
            ChatTemplate.of("{{ raise_exception('roles must alternate') }}").render(emptyList())
        }
        assertTrue(e.message!!.contains("roles must alternate"), e.message)
    }

    @Test
    fun `a render is bounded in time`() {
        val slow = ChatTemplate.of(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
            emptyMap(), Duration.ofMillis(300),
        )
        val start = System.nanoTime()
        assertThrows<DbrxTemplateException> { slow.render(emptyList()) }
        assertTrue(System.nanoTime() - start < 5_000_000_000L)
    }
}
