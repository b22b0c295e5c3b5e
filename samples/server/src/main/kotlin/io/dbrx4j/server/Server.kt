package io.dbrx4j.server

import com.fasterxml.jackson.core.JacksonException
import com.fasterxml.jackson.core.json.JsonReadFeature
import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.ObjectMapper
import com.fasterxml.jackson.databind.json.JsonMapper
import io.ktor.http.ContentType
import io.ktor.http.HttpHeaders
import io.ktor.http.HttpStatusCode
import io.ktor.server.application.Application
import io.ktor.server.application.ApplicationCall
import io.ktor.server.engine.EmbeddedServer
import io.ktor.server.engine.embeddedServer
import io.ktor.server.netty.Netty
import io.ktor.server.request.contentLength
import io.ktor.server.request.header
import io.ktor.server.request.httpMethod
import io.ktor.server.request.path
import io.ktor.server.request.receiveChannel
import io.ktor.server.response.respondText
import io.ktor.server.routing.get
import io.ktor.server.routing.post
import io.ktor.server.routing.route
import io.ktor.server.routing.routing
import io.ktor.utils.io.discard
import io.ktor.utils.io.readRemaining
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.cancel
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withContext
import kotlinx.io.readByteArray
import org.slf4j.LoggerFactory
import java.security.MessageDigest
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicInteger

/** What one request did, for its log line. */
class RequestLog(val method: String, val path: String) {
    val startNanos = System.nanoTime()
    var status = 200
    var detail = ""
}

/**
 * The OpenAI-compatible HTTP server: routes, authentication, body limits, error shapes and logging.
 * Generation itself is [Streaming] over the SDK; the model's life is [host].
 */
class DbrxServer(val config: ServerConfig, val host: ModelHost) : AutoCloseable {
    private val access = LoggerFactory.getLogger("io.dbrx4j.server.access")
    val metrics = Metrics()
    val admission = Admission(config.maxConcurrent, config.maxQueue)
    val mapper: ObjectMapper = JsonMapper.builder().enable(JsonReadFeature.ALLOW_NON_NUMERIC_NUMBERS).build()

    /** Pumps block in TokenStream.hasNext: their own threads, so Ktor's and Dispatchers.IO's stay free. */
    private val pumpThreads = AtomicInteger()
    private val pumpExecutor = Executors.newCachedThreadPool { r ->
        Thread(r, "dbrx4j-pump-${pumpThreads.incrementAndGet()}").apply { isDaemon = true }
    }
    val pumpScope = CoroutineScope(SupervisorJob() + pumpExecutor.asCoroutineDispatcher())
    private val streaming = Streaming(this)
    private val encoderLazy = lazy { PromptEncoder.load(config.modelDir) }
    private val encoder: PromptEncoder by encoderLazy
    private var server: EmbeddedServer<*, *>? = null

    /** Starts listening (the model may still be loading); returns the bound port. */
    fun start(): Int {
        val s = embeddedServer(Netty, port = config.port, host = config.host) { module() }
        s.start(wait = false)
        server = s
        return runBlocking { s.engine.resolvedConnectors().first().port }
    }

    fun awaitTermination() {
        Thread.currentThread().join()
    }

    private fun Application.module() {
        routing {
            get("/health") {
                serve(call) {
                    val state = host.state
                    val ok = state == ModelHost.State.READY
                    log.detail = state.name.lowercase()
                    log.status = if (ok) 200 else 503
                    val body = mapper.createObjectNode().put("status", state.name.lowercase()).put("message", host.reason)
                    call.respondText(mapper.writeValueAsString(body), ContentType.Application.Json, HttpStatusCode.fromValue(log.status))
                }
            }
            get("/metrics") {
                serve(call) {
                    authorize(call)
                    val text = metrics.render(admission.running, admission.waiting, host.stats())
                    call.respondText(text, ContentType.parse("text/plain; version=0.0.4; charset=utf-8"))
                }
            }
            get("/v1/models") {
                serve(call) {
                    authorize(call)
                    val body = mapper.createObjectNode().put("object", "list")
                    body.putArray("data").add(modelObject())
                    respondJson(call, body)
                }
            }
            get("/v1/models/{id}") {
                serve(call) {
                    authorize(call)
                    val id = call.parameters["id"]
                    if (id != config.modelName) throw unknownModel(id)
                    respondJson(call, modelObject())
                }
            }
            post(Endpoint.CHAT.path) { serve(call) { generate(call, Endpoint.CHAT, log) } }
            post(Endpoint.COMPLETIONS.path) { serve(call) { generate(call, Endpoint.COMPLETIONS, log) } }
            route("{...}") {
                handle {
                    serve(call) {
                        throw ApiError(404, "no such endpoint: ${call.request.httpMethod.value} ${call.request.path()}", code = "not_found")
                    }
                }
            }
        }
    }

    private fun modelObject() = mapper.createObjectNode()
        .put("id", config.modelName).put("object", "model").put("created", 0).put("owned_by", "dbrx4j")

    private fun unknownModel(id: String?) = ApiError(
        404, "the model '$id' does not exist: this server serves '${config.modelName}'", param = "model", code = "model_not_found",
    )

    class Scope(val log: RequestLog)

    /** Runs a handler: errors become OpenAI-shaped responses; one log line per request. */
    private suspend fun serve(call: ApplicationCall, handler: suspend Scope.() -> Unit) {
        val log = RequestLog(call.request.httpMethod.value, call.request.path())
        try {
            Scope(log).handler()
        } catch (e: ApiError) {
            log.status = e.status
            log.detail = (log.detail + " error=" + e.code + ": " + e.message).trim()
            respondError(call, e)
        } catch (e: kotlinx.coroutines.CancellationException) {
            log.status = 499
            log.detail = (log.detail + " client closed the connection").trim()
            throw e
        } catch (t: Throwable) {
            val e = host.toApiError(t)
            log.status = e.status
            log.detail = (log.detail + " error=" + e.code + ": " + e.message).trim()
            respondError(call, e)
        } finally {
            // Bounded label values: the known paths, models/{id}, and "other".
            val label = when {
                log.path in KNOWN -> log.path
                log.path.startsWith("/v1/models/") -> "/v1/models/{id}"
                else -> "other"
            }
            metrics.countRequest(label, log.status)
            val ms = (System.nanoTime() - log.startNanos) / 1e6
            access.info("{} {} {} {}ms {}", log.method, log.path, log.status, "%.1f".format(ms), log.detail)
        }
    }

    private suspend fun respondError(call: ApplicationCall, e: ApiError) {
        if (e.status == 401) call.response.headers.append(HttpHeaders.WWWAuthenticate, "Bearer")
        try {
            call.respondText(mapper.writeValueAsString(errorBody(e)), ContentType.Application.Json, HttpStatusCode.fromValue(e.status))
        } catch (_: IllegalStateException) {
            // The response had begun (a stream): the stream reported the error itself.
        }
    }

    suspend fun respondJson(call: ApplicationCall, body: JsonNode) =
        call.respondText(mapper.writeValueAsString(body), ContentType.Application.Json)

    private fun authorize(call: ApplicationCall) {
        val key = config.apiKey ?: return
        val header = call.request.header(HttpHeaders.Authorization)
            ?: throw ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code = "missing_api_key")
        val given = header.removePrefix("Bearer ").trim()
        if (!header.startsWith("Bearer ") || !MessageDigest.isEqual(given.toByteArray(), key.toByteArray())) {
            throw ApiError(401, "incorrect API key provided", code = "invalid_api_key")
        }
    }

    /** The body, at most [ServerConfig.maxBodyBytes] (413 beyond), parsed as JSON (400 when it is not). */
    private suspend fun readJson(call: ApplicationCall): JsonNode {
        val limit = config.maxBodyBytes
        val declared = call.request.contentLength()
        val channel = call.receiveChannel()
        val tooLarge = ApiError(413, "the request body exceeds this server's limit of $limit bytes", code = "request_too_large")
        if (declared != null && declared > limit) {
            channel.discard(DRAIN_LIMIT)
            throw tooLarge
        }
        val bytes = channel.readRemaining(limit + 1).readByteArray()
        if (bytes.size > limit) {
            channel.discard(DRAIN_LIMIT)
            throw tooLarge
        }
        if (bytes.isEmpty()) throw ApiError.invalid(null, "the request body is empty: expected a JSON object", code = "invalid_json")
        return try {
            mapper.readTree(bytes)
        } catch (e: JacksonException) {
            throw ApiError.invalid(null, "the request body is not valid JSON: ${e.originalMessage}", code = "invalid_json")
        }
    }

    private suspend fun generate(call: ApplicationCall, endpoint: Endpoint, log: RequestLog) {
        authorize(call)
        val body = readJson(call)
        val model = host.require()
        body.get("model")?.takeIf { it.isTextual }?.asText()?.let { if (it != config.modelName) throw unknownModel(it) }
        val req = RequestParser.parse(endpoint, body, config)
        log.detail = "stream=${req.stream} n=${req.n}" + (req.user?.let { " user=${it.take(64)}" } ?: "")
        val jobs = withContext(Dispatchers.Default) {
            try {
                Planner.plan(model, encoder, req, config)
            } catch (t: Throwable) {
                throw host.toApiError(t)
            }
        }
        admission.withSlot { streaming.run(call, req, model, jobs, log) }
    }

    override fun close() {
        server?.stop(500, 2000)
        pumpScope.cancel()
        host.close()
        if (encoderLazy.isInitialized()) encoder.close()
        pumpExecutor.shutdownNow()
    }

    private companion object {
        const val DRAIN_LIMIT = 64L shl 20
        val KNOWN = setOf("/health", "/metrics", "/v1/models", Endpoint.CHAT.path, Endpoint.COMPLETIONS.path)
    }
}
