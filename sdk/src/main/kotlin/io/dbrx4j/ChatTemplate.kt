package io.dbrx4j

import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.ObjectMapper
import com.hubspot.jinjava.JinjavaConfig
import com.hubspot.jinjava.LegacyOverrides
import com.hubspot.jinjava.el.JinjavaNodePreProcessor
import com.hubspot.jinjava.interpret.Context
import com.hubspot.jinjava.interpret.JinjavaInterpreter
import com.hubspot.jinjava.interpret.TemplateError
import com.hubspot.jinjava.lib.fn.ELFunctionDefinition
import com.hubspot.jinjava.loader.ResourceLocator
import io.dbrx4j.internal.Jinja2Jinjava
import java.io.IOException
import java.nio.charset.Charset
import java.nio.file.Files
import java.nio.file.Path
import java.time.Duration
import java.util.concurrent.ExecutionException
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit
import java.util.concurrent.TimeoutException

/**
 * A checkpoint's `chat_template` (tokenizer_config.json), rendered the way Hugging Face does
 * (trim_blocks, lstrip_blocks, Jinja2 operator precedence, `raise_exception`) by Jinjava in a sandbox:
 * templates cannot include or import files, they see only plain strings, lists and maps (no Java objects
 * to reflect on), recursion, ranges and output size are capped, and one render is bounded in time.
 * DBRX's template inserts DBRX's default system prompt when the messages carry none. Thread-safe.
 */
class ChatTemplate private constructor(
    /** The Jinja source. */
    val source: String,
    private val specialTokens: Map<String, String>,
    private val timeout: Duration,
) {
    /** Renders [messages]; with [addGenerationPrompt] the text ends where the assistant's answer begins. */
    @JvmOverloads
    fun render(messages: List<ChatMessage>, addGenerationPrompt: Boolean = true, extra: Map<String, Any?> = emptyMap()): String {
        val bindings = HashMap<String, Any?>(specialTokens)
        bindings.putAll(extra)
        bindings["messages"] = messages.map { mapOf("role" to it.role, "content" to it.content) }
        bindings["add_generation_prompt"] = addGenerationPrompt
        val job = RENDERER.submit<String> { renderNow(bindings) }
        try {
            return job.get(timeout.toMillis(), TimeUnit.MILLISECONDS)
        } catch (e: TimeoutException) {
            job.cancel(true)
            throw DbrxTemplateException("chat template render exceeded $timeout")
        } catch (e: ExecutionException) {
            throw e.cause as? DbrxException ?: DbrxTemplateException("chat template failed: ${e.cause?.message}", e.cause)
        } catch (e: InterruptedException) {
            job.cancel(true)
            Thread.currentThread().interrupt()
            throw DbrxTemplateException("interrupted while rendering the chat template", e)
        }
    }

    private fun renderNow(bindings: Map<String, Any?>): String {
        RAISED.remove()
        val result = JINJAVA.renderForResult(source, bindings)
        RAISED.get()?.let { RAISED.remove(); throw DbrxTemplateException("chat template rejected the messages: $it") }
        val fatal = result.errors.firstOrNull { it.severity == TemplateError.ErrorType.FATAL }
        if (fatal != null) {
            throw DbrxTemplateException("chat template: ${fatal.message}" + (fatal.lineno.takeIf { it > 0 }?.let { " (line $it)" } ?: ""))
        }
        return result.output
    }

    companion object {
        private const val MAX_OUTPUT = 16L shl 20

        /** The message of raise_exception on the rendering thread (Jinjava swallows the exception itself). */
        private val RAISED = ThreadLocal<String>()

        /** HF templates call raise_exception(msg) to reject a conversation. */
        @JvmStatic
        fun raiseException(message: String): Any {
            RAISED.set(message)
            throw DbrxTemplateException("chat template rejected the messages: $message")
        }

        private val JINJAVA = Jinja2Jinjava(
            JinjavaConfig.newBuilder()
                .withTrimBlocks(true)
                .withLstripBlocks(true)
                .withLegacyOverrides(
                    LegacyOverrides.newBuilder()
                        .withUseNaturalOperatorPrecedence(true)
                        .withParseWhitespaceControlStrictly(true)
                        .withEvaluateMapKeys(true)
                        .withIterateOverMapKeys(true)
                        .withUsePyishObjectMapper(true)
                        .build(),
                )
                .withDisabled(mapOf(Context.Library.TAG to setOf("include", "import", "from", "extends")))
                .withMaxOutputSize(MAX_OUTPUT)
                .withMaxStringLength(MAX_OUTPUT)
                .withMaxRenderDepth(16)
                .withMaxMacroRecursionDepth(16)
                .withEnableRecursiveMacroCalls(false)
                .withRangeLimit(100_000)
                .withMaxListSize(100_000)
                .withMaxMapSize(100_000)
                .withNestedInterpretationEnabled(false)
                // checks Thread.interrupted() before every node: a timed-out render stops when cancelled
                .withNodePreProcessor(JinjavaNodePreProcessor())
                .build(),
        ).apply {
            resourceLocator = NoFiles
            globalContext.registerFunction(
                ELFunctionDefinition("", "raise_exception", ChatTemplate::class.java, "raiseException", String::class.java),
            )
        }

        private val RENDERER = Executors.newCachedThreadPool { r ->
            Thread(r, "dbrx4j-chat-template").apply { isDaemon = true }
        }

        /** DBRX's own template, for checkpoints whose tokenizer_config.json has none. */
        @JvmStatic
        val DBRX_DEFAULT: String by lazy {
            ChatTemplate::class.java.getResourceAsStream("dbrx_chat_template.jinja")!!.use { String(it.readAllBytes(), Charsets.UTF_8) }
        }

        /** A template from source; [specialTokens] become variables (bos_token, eos_token, ...). */
        @JvmStatic
        @JvmOverloads
        fun of(source: String, specialTokens: Map<String, String> = emptyMap(), timeout: Duration = Duration.ofSeconds(2)) =
            ChatTemplate(source, specialTokens.toMap(), timeout)

        /** The template of a checkpoint directory (tokenizer_config.json), or DBRX's when it has none. */
        @JvmStatic
        @JvmOverloads
        fun load(dir: Path, timeout: Duration = Duration.ofSeconds(2)): ChatTemplate {
            val file = dir.resolve("tokenizer_config.json")
            if (!Files.isRegularFile(file)) return of(DBRX_DEFAULT, emptyMap(), timeout)
            val config: JsonNode = try {
                ObjectMapper().readTree(file.toFile())
            } catch (e: IOException) {
                throw DbrxBadCheckpointException("BAD_CHECKPOINT", "cannot parse $file: ${e.message}", e)
            }
            val tokens = HashMap<String, String>()
            for (name in listOf("bos_token", "eos_token", "unk_token", "pad_token")) {
                val node = config.get(name) ?: continue
                val text = if (node.isObject) node.get("content")?.asText() else if (node.isTextual) node.asText() else null
                if (text != null) tokens[name] = text
            }
            return of(templateSource(config.get("chat_template")) ?: DBRX_DEFAULT, tokens, timeout)
        }

        /** chat_template is a string, or a list of {name, template} of which "default" is the one. */
        private fun templateSource(node: JsonNode?): String? = when {
            node == null || node.isNull -> null
            node.isTextual -> node.asText()
            node.isArray -> node.firstOrNull { it.get("name")?.asText() == "default" }?.get("template")?.asText()
            else -> null
        }
    }

    private object NoFiles : ResourceLocator {
        override fun getString(fullName: String, encoding: Charset, interpreter: JinjavaInterpreter): String =
            throw IOException("chat templates may not read files ($fullName)")
    }
}
