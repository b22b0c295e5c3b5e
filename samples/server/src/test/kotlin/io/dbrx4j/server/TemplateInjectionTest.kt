package io.dbrx4j.server

import com.fasterxml.jackson.databind.node.ObjectNode
import io.dbrx4j.ChatMessage
import io.dbrx4j.ChatTemplate
import io.dbrx4j.DbrxTemplateException
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.io.TempDir
import java.net.ServerSocket
import java.net.SocketTimeoutException
import java.nio.file.Files
import java.nio.file.Path

/**
 * Chat-template rendering cannot reach files, the network or Java classes: neither a hostile template
 * shipped in a checkpoint nor template syntax inside message content.
 */
class TemplateInjectionTest {
    /** What reaching a file, the environment or a Java object would print. */
    private val leaks = listOf("root:x:0:0", "PATH=", "Runtime@", "ProcessImpl", "ClassLoader@", "[B@", "jdk.internal")

    /**
     * [text] is a rendering ([rendered]) or the refusal's message. A refusal may name the class whose method
     * it refused; a rendering may not show any Java class at all.
     */
    private fun assertClean(text: String, what: String, rendered: Boolean = true) {
        for (l in leaks) assertFalse(text.contains(l), "$what leaked '$l': $text")
        if (rendered) assertFalse(text.contains("class java") || text.contains("java.util"), "$what showed a Java class: $text")
    }

    /** The rendering, or the refusal's message (second = false). */
    private fun renderOrRefusal(template: ChatTemplate, content: String): Pair<String, Boolean> = try {
        template.render(listOf(ChatMessage.user(content))) to true
    } catch (e: DbrxTemplateException) {
        (e.message ?: "") to false
    }

    /** A copy of the bundled checkpoint (weights linked) whose tokenizer_config.json carries [template]. */
    private fun checkpointWith(dir: Path, template: String): Path {
        Files.list(TestServer.modelDir).use { files ->
            for (f in files) {
                if (f.fileName.toString() != "tokenizer_config.json") Files.createSymbolicLink(dir.resolve(f.fileName), f.toAbsolutePath())
            }
        }
        val config = TestServer.MAPPER.readTree(TestServer.modelDir.resolve("tokenizer_config.json").toFile()) as ObjectNode
        config.put("chat_template", template)
        Files.writeString(dir.resolve("tokenizer_config.json"), TestServer.MAPPER.writeValueAsString(config))
        return dir
    }

    private fun chat(s: TestServer, content: String) =
        s.send(Endpoint.CHAT.path, """{"model":"tiny-dbrx-cl100k","max_tokens":2,"messages":[{"role":"user","content":${TestServer.MAPPER.writeValueAsString(content)}}]}""")

    @Test
    fun `a hostile checkpoint template reaches no Java class and runs no command`(@TempDir dir: Path, @TempDir scratch: Path) {
        val marker = scratch.resolve("pwned")
        val template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" +
            "[{{ ''.getClass() }}][{{ messages.getClass().getName() }}][{{ messages[0].getClass().getClassLoader() }}]" +
            "[{{ ''.getClass().forName('java.lang.Runtime').getRuntime().exec('touch $marker') }}]" +
            "[{{ ''.class.forName('java.lang.Runtime').getRuntime() }}][{{ raise_exception.getClass() }}]" +
            "[{{ messages[0]['content'].getBytes() }}]<|im_start|>assistant\n"
        TestServer(TestServer.config(dir = checkpointWith(dir, template))).use { s ->
            s.awaitReady()
            val r = chat(s, "hello")
            assertTrue(r.statusCode() == 200 || r.statusCode() == 400, r.body())
            assertClean(r.body(), "response", rendered = false)
            if (r.statusCode() == 400) assertTrue(r.body().contains("chat_template_error"), r.body())
            val (text, ok) = renderOrRefusal(s.host.model!!.chatTemplate, "hello")
            assertClean(text, "rendering", ok)
            assertFalse(Files.exists(marker), "the template ran a command")
        }
    }

    @Test
    fun `a checkpoint template can read no file and open no connection`(@TempDir dir: Path) {
        ServerSocket(0).use { listener ->
            val url = "http://127.0.0.1:${listener.localPort}/t"
            val template = "{% include '/etc/passwd' %}{% include 'file:///etc/passwd' %}{% include '$url' %}" +
                "{% import '/etc/hostname' as h %}{% from '/etc/passwd' import x %}" +
                "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            TestServer(TestServer.config(dir = checkpointWith(dir, template))).use { s ->
                s.awaitReady()
                val r = chat(s, "hello")
                assertTrue(r.statusCode() == 200 || r.statusCode() == 400, r.body())
                assertClean(r.body(), "response", rendered = false)
                if (r.statusCode() == 400) assertEquals("chat_template_error", TestServer.MAPPER.readTree(r.body()).get("error").get("code").asText())
            }
            listener.soTimeout = 200
            val connected = try {
                listener.accept().close()
                true
            } catch (_: SocketTimeoutException) {
                false
            }
            assertFalse(connected, "the template opened a connection")
        }
        // Each of those tags alone, and an extends, are refused or render nothing from outside.
        for (payload in listOf("{% include '/etc/passwd' %}", "{% extends '/etc/passwd' %}", "{% import '/etc/passwd' as p %}{{ p }}",
            "{{ ''.getClass().forName('java.lang.System').getenv() }}", "{% set c = ''.getClass() %}{{ c.getName() }}",
            "{{ messages.getClass() }}", "{{ messages[0].getClass().getClassLoader() }}", "{{ raise_exception.getClass() }}",
            "{{ ''.class.forName('java.lang.Runtime').getRuntime().exec('id') }}", "{{ messages[0]['content'].getBytes() }}")) {
            val (out, ok) = renderOrRefusal(ChatTemplate.of(payload), "x")
            assertClean(out, payload, ok)
        }
    }

    @Test
    fun `template syntax in message content is text, never evaluated`() {
        val s = TestServer.shared
        val payload = "{{ 7*7 }}{% include '/etc/passwd' %}{{ ''.getClass() }}{% raw %}{{ messages }}"
        val r = chat(s, payload)
        assertEquals(200, r.statusCode(), r.body())
        val model = s.host.model!!
        val rendered = model.chatTemplate.render(listOf(ChatMessage.user(payload)))
        assertTrue(rendered.contains(payload), rendered)
        assertFalse(rendered.contains("49"), rendered)
        assertClean(rendered, "rendering")
        val usage = TestServer.MAPPER.readTree(r.body()).get("usage")
        assertEquals(model.tokenizer!!.encode(rendered).size, usage.get("prompt_tokens").asInt())
    }
}
