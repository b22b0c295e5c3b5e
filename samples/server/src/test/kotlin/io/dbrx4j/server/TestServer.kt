package io.dbrx4j.server

import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.ObjectMapper
import io.dbrx4j.Dbrx
import io.dbrx4j.DbrxModel
import io.dbrx4j.LoadOptions
import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.nio.file.Path
import java.nio.file.Paths
import java.time.Duration

/** A real server on a loopback port over the bundled checkpoint, with a few helpers to call it. */
class TestServer(config: ServerConfig, loader: () -> DbrxModel = { Dbrx.load(config.modelDir, config.loadOptions()) }) : AutoCloseable {
    val host = ModelHost(loader)
    val server = DbrxServer(config, host)
    val port: Int
    val base: String
    val key: String? = config.apiKey

    init {
        host.start()
        port = server.start()
        base = "http://127.0.0.1:$port"
    }

    fun awaitReady(timeout: Duration = Duration.ofSeconds(120)): TestServer {
        val deadline = System.nanoTime() + timeout.toNanos()
        while (host.state == ModelHost.State.LOADING) {
            check(System.nanoTime() < deadline) { "the model did not load within $timeout" }
            Thread.sleep(50)
        }
        check(host.state == ModelHost.State.READY) { host.reason }
        return this
    }

    fun request(path: String, body: String? = null, auth: String? = key?.let { "Bearer $it" }): HttpRequest {
        val b = HttpRequest.newBuilder(URI.create(base + path)).timeout(Duration.ofSeconds(120))
        if (auth != null) b.header("Authorization", auth)
        if (body != null) b.header("Content-Type", "application/json").POST(HttpRequest.BodyPublishers.ofString(body)) else b.GET()
        return b.build()
    }

    fun send(path: String, body: String? = null, auth: String? = key?.let { "Bearer $it" }): HttpResponse<String> =
        HTTP.send(request(path, body, auth), HttpResponse.BodyHandlers.ofString())

    fun json(path: String, body: String? = null): JsonNode {
        val r = send(path, body)
        check(r.statusCode() == 200) { "$path answered ${r.statusCode()}: ${r.body()}" }
        return MAPPER.readTree(r.body())
    }

    /** Streams [body] and returns the data payloads of its events, [DONE] included. */
    fun events(path: String, body: String): List<String> {
        val r = HTTP.send(request(path, body), HttpResponse.BodyHandlers.ofLines())
        check(r.statusCode() == 200) { "$path answered ${r.statusCode()}" }
        return r.body().use { lines -> lines.filter { it.startsWith("data: ") }.map { it.removePrefix("data: ") }.toList() }
    }

    override fun close() = server.close()

    companion object {
        val MAPPER = ObjectMapper()
        val HTTP: HttpClient = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).connectTimeout(Duration.ofSeconds(10)).build()
        const val KEY = "sk-test-dbrx4j"

        val modelDir: Path = Paths.get(System.getProperty("dbrx.model.dir") ?: "../../models/tiny-dbrx-cl100k").toAbsolutePath()

        fun config(apiKey: String? = KEY, dir: Path = modelDir) = ServerConfig(
            modelDir = dir, modelName = "tiny-dbrx-cl100k", port = 0, apiKey = apiKey, threads = 2,
            maxConcurrent = 64, maxQueue = 512, maxTokens = 2048, maxN = 4,
        )

        /** One server (with an API key) shared by the test classes of this JVM. */
        val shared: TestServer by lazy {
            TestServer(config()).awaitReady().also { s -> Runtime.getRuntime().addShutdownHook(Thread { s.close() }) }
        }

        fun load(dir: Path = modelDir): DbrxModel = Dbrx.load(dir, LoadOptions.builder().threads(2).build())
    }
}
