package io.dbrx4j.server

import io.dbrx4j.DbrxModel
import io.dbrx4j.Token
import io.ktor.http.ContentType
import io.ktor.http.HttpHeaders
import io.ktor.http.HttpStatusCode
import io.ktor.server.application.ApplicationCall
import io.ktor.server.netty.NettyApplicationCall
import io.ktor.server.response.header
import io.ktor.server.routing.RoutingCall
import kotlinx.coroutines.delay
import kotlinx.coroutines.isActive
import kotlinx.coroutines.launch
import io.ktor.server.response.respondBytesWriter
import io.ktor.utils.io.ByteWriteChannel
import io.ktor.utils.io.writeStringUtf8
import com.fasterxml.jackson.databind.JsonNode

/**
 * Runs the choices of one request and answers: one JSON body, or server-sent events with a flush per
 * event. A stream whose client goes away (a failed write) cancels every choice at once, which frees
 * their KV blocks; the engine never waits on a reader.
 */
class Streaming(private val server: DbrxServer) {
    private val metrics = server.metrics

    suspend fun run(call: ApplicationCall, req: GenerationRequest, model: DbrxModel, jobs: List<ChoiceJob>, log: RequestLog) {
        val gen = try {
            Generation(model, jobs)
        } catch (t: Throwable) {
            throw server.host.toApiError(t)
        }
        val promptTokens = req.prompts.indices.sumOf { p -> jobs.first { it.promptIndex == p }.ids.size }
        metrics.promptTokens.add(promptTokens.toLong())
        val shapes = ResponseShapes(req.endpoint, server.config.modelName, TokenTexts(model.tokenizer), req)
        val choices = jobs.map { ChoiceState(it.index) }.associateBy { it.index }
        val arrival = log.startNanos
        var firstToken = true
        try {
            gen.start(server.pumpScope)
            // Drains the events until every choice has ended; the callbacks write (streaming) or do nothing.
            suspend fun consume(onToken: suspend (ChoiceState, Token) -> Unit, onEnd: suspend (ChoiceState) -> Unit) {
                var open = choices.size
                for (ev in gen.events) {
                    val c = choices.getValue(ev.index)
                    when (ev) {
                        is ChoiceEvent.Tok -> {
                            if (firstToken) {
                                firstToken = false
                                metrics.timeToFirstToken.observe((ev.nanos - arrival) / 1e9)
                            } else if (c.lastTokenNanos != 0L) {
                                metrics.interTokenLatency.observe((ev.nanos - c.lastTokenNanos) / 1e9)
                            }
                            c.lastTokenNanos = ev.nanos
                            c.tokens.add(ev.token)
                            metrics.completionTokens.increment()
                            onToken(c, ev.token)
                            c.text.append(ev.token.text)
                        }
                        is ChoiceEvent.End -> {
                            c.finish = ev.reason
                            onEnd(c)
                            if (--open == 0) return
                        }
                        is ChoiceEvent.Fail -> throw server.host.toApiError(ev.error)
                    }
                }
            }
            if (!req.stream) {
                // Nothing is written until the end, so a hang-up shows only on the connection itself.
                val gone = java.util.concurrent.atomic.AtomicBoolean(false)
                val watchdog = server.pumpScope.launch {
                    while (isActive) {
                        delay(WATCH_MS)
                        if (!connectionOpen(call)) {
                            gone.set(true)
                            metrics.disconnects.increment()
                            gen.close()
                            break
                        }
                    }
                }
                try {
                    consume({ _, _ -> }, { })
                } finally {
                    watchdog.cancel()
                }
                if (gone.get()) throw kotlinx.coroutines.CancellationException("the client closed the connection")
                val body = shapes.whole(jobs.map { choices.getValue(it.index) }, promptTokens)
                log.detail += summary(promptTokens, choices.values)
                server.respondJson(call, body)
            } else {
                stream(call, req, shapes, choices.values, promptTokens, log) { send ->
                    consume(
                        { c, t ->
                            if (t.text.isNotEmpty() || req.logprobs) send(shapes.deltaChunk(c.index, t.text, listOf(t), c.text.length))
                        },
                        { c -> send(shapes.finishChunk(c.index, c.finish)) },
                    )
                }
            }
        } finally {
            gen.close()
            metrics.requestDuration.observe((System.nanoTime() - arrival) / 1e9)
        }
    }

    private suspend fun stream(
        call: ApplicationCall,
        req: GenerationRequest,
        shapes: ResponseShapes,
        choices: Collection<ChoiceState>,
        promptTokens: Int,
        log: RequestLog,
        body: suspend (send: suspend (JsonNode) -> Unit) -> Unit,
    ) {
        call.response.header(HttpHeaders.CacheControl, "no-cache")
        call.response.header("X-Accel-Buffering", "no")
        var completed = false
        call.respondBytesWriter(ContentType.Text.EventStream, HttpStatusCode.OK) {
            val out: ByteWriteChannel = this
            suspend fun event(data: String) {
                out.writeStringUtf8("data: $data\n\n")
                out.flush()
            }
            val send: suspend (JsonNode) -> Unit = { event(server.mapper.writeValueAsString(it)) }
            try {
                if (req.endpoint == Endpoint.CHAT) for (c in choices.sortedBy { it.index }) send(shapes.roleChunk(c.index))
                try {
                    body(send)
                } catch (e: ApiError) {
                    // Headers are gone: the failure travels as an error event, and no [DONE] follows.
                    log.status = e.status
                    log.detail += " error=${e.code}: ${e.message}"
                    send(errorBody(e))
                    return@respondBytesWriter
                }
                if (req.includeUsage) send(shapes.usageChunk(promptTokens, choices.sumOf { it.tokens.size }))
                event("[DONE]")
                completed = true
            } catch (t: Throwable) {
                if (t !is ApiError) {
                    // A write failed or the call was cancelled: the client is gone.
                    metrics.disconnects.increment()
                    log.status = 499
                }
                throw t
            } finally {
                log.detail += summary(promptTokens, choices) + if (completed) "" else " incomplete"
            }
        }
    }

    /** False once the client's connection is gone (Netty engine; other engines are assumed open). */
    private fun connectionOpen(call: ApplicationCall): Boolean {
        val engineCall = (call as? RoutingCall)?.pipelineCall?.engineCall ?: call
        return (engineCall as? NettyApplicationCall)?.context?.channel()?.isActive ?: true
    }

    private companion object {
        const val WATCH_MS = 100L
    }

    private fun summary(promptTokens: Int, choices: Collection<ChoiceState>): String =
        " prompt_tokens=$promptTokens completion_tokens=${choices.sumOf { it.tokens.size }}" +
            " finish=" + choices.sortedBy { it.index }.joinToString(",") { finishName(it.finish) ?: "none" }
}
