package io.dbrx4j.server

import io.dbrx4j.Device
import io.dbrx4j.LoadOptions
import java.nio.file.Path
import java.nio.file.Paths

/**
 * Everything the server can be told. Each option is a flag (--port 8000 or --port=8000) and an
 * environment variable (DBRX_PORT); a flag wins over the environment.
 */
data class ServerConfig(
    val modelDir: Path,
    /** The id clients pass as "model"; defaults to the checkpoint directory's name. */
    val modelName: String = modelDir.fileName.toString(),
    val host: String = "127.0.0.1",
    val port: Int = 8000,
    /** null: no authentication. */
    val apiKey: String? = null,
    val device: Device = Device.CPU,
    val deviceId: Int = 0,
    val threads: Int = 0,
    val tensorParallel: Int = 1,
    val expertParallel: Int = 1,
    val kvCacheBytes: Long = 0,
    val kvBlocks: Int = 0,
    val maxContext: Int = 0,
    /** Engine knobs; null keeps the engine's defaults. */
    val engineMaxRunning: Int? = null,
    val engineMaxWaiting: Int? = null,
    val maxBatchTokens: Int? = null,
    /** HTTP requests generating at once; more wait in the queue. */
    val maxConcurrent: Int = 64,
    /** HTTP requests waiting for a slot; beyond it requests get 429. */
    val maxQueue: Int = 256,
    val maxBodyBytes: Long = 1L shl 20,
    /** Upper bound on max_tokens; also the default when a request names none. */
    val maxTokens: Int = 1024,
    /** Upper bound on choices per request (n times the number of prompts). */
    val maxN: Int = 8,
    /** Most stop strings per request. */
    val maxStop: Int = 16,
) {
    fun loadOptions(): LoadOptions = LoadOptions.builder()
        .device(device).deviceId(deviceId).threads(threads)
        .tensorParallel(tensorParallel).expertParallel(expertParallel)
        .kvCacheBytes(kvCacheBytes).kvBlocks(kvBlocks).maxContext(maxContext)
        .apply {
            engineMaxRunning?.let { maxRunning(it) }
            engineMaxWaiting?.let { maxWaiting(it) }
            maxBatchTokens?.let { maxBatchTokens(it) }
        }
        .build()

    companion object {
        /** name, environment variable, help. */
        val OPTIONS = listOf(
            Triple("model-dir", "DBRX_MODEL_DIR", "checkpoint directory (required)"),
            Triple("model-name", "DBRX_MODEL_NAME", "model id served (default: the directory's name)"),
            Triple("host", "DBRX_HOST", "bind address (default 127.0.0.1)"),
            Triple("port", "DBRX_PORT", "port (default 8000; 0 = any free port)"),
            Triple("api-key", "DBRX_API_KEY", "require 'Authorization: Bearer KEY' on every endpoint but /health"),
            Triple("device", "DBRX_DEVICE", "cpu or cuda (default cpu)"),
            Triple("device-id", "DBRX_DEVICE_ID", "first CUDA device (default 0)"),
            Triple("threads", "DBRX_THREADS", "CPU backend threads (default 0 = all cores)"),
            Triple("tensor-parallel", "DBRX_TENSOR_PARALLEL", "tensor-parallel ranks (default 1)"),
            Triple("expert-parallel", "DBRX_EXPERT_PARALLEL", "expert-parallel ranks (default 1)"),
            Triple("kv-cache-bytes", "DBRX_KV_CACHE_BYTES", "KV-cache pool in bytes, suffixes k/m/g (default: engine's share)"),
            Triple("kv-blocks", "DBRX_KV_BLOCKS", "KV-cache pool in blocks (overrides --kv-cache-bytes)"),
            Triple("max-context", "DBRX_MAX_CONTEXT", "per-request context limit (default: the model's)"),
            Triple("engine-max-running", "DBRX_ENGINE_MAX_RUNNING", "sequences in the engine's running batch (default: engine's, 256)"),
            Triple("engine-max-waiting", "DBRX_ENGINE_MAX_WAITING", "sequences queued in the engine before 429 (default: engine's, 4096)"),
            Triple("max-batch-tokens", "DBRX_MAX_BATCH_TOKENS", "tokens per engine step (default: engine's, 2048)"),
            Triple("max-concurrent", "DBRX_MAX_CONCURRENT", "requests generating at once (default 64)"),
            Triple("max-queue", "DBRX_MAX_QUEUE", "requests waiting beyond that before 429 (default 256)"),
            Triple("max-body-bytes", "DBRX_MAX_BODY_BYTES", "largest request body, suffixes k/m/g (default 1m)"),
            Triple("max-tokens", "DBRX_MAX_TOKENS", "largest max_tokens, and the default (default 1024)"),
            Triple("max-n", "DBRX_MAX_N", "most choices per request (default 8)"),
            Triple("max-stop", "DBRX_MAX_STOP", "most stop strings per request (default 16)"),
        )

        fun usage(): String = buildString {
            append("usage: java -jar dbrx4j-server-all.jar --model-dir DIR [options]\n")
            for ((name, env, help) in OPTIONS) append("  --%-18s %-22s %s\n".format(name, env, help))
        }

        /** Parses flags over [env]; throws IllegalArgumentException naming the bad option. */
        fun parse(args: Array<String>, env: Map<String, String> = System.getenv()): ServerConfig {
            val values = HashMap<String, String>()
            for ((name, envName, _) in OPTIONS) env[envName]?.takeIf { it.isNotEmpty() }?.let { values[name] = it }
            var i = 0
            while (i < args.size) {
                val arg = args[i]
                require(arg.startsWith("--")) { "unexpected argument '$arg'\n${usage()}" }
                val eq = arg.indexOf('=')
                val name = if (eq > 0) arg.substring(2, eq) else arg.substring(2)
                require(OPTIONS.any { it.first == name }) { "unknown option --$name\n${usage()}" }
                val value = if (eq > 0) arg.substring(eq + 1) else args.getOrNull(++i)
                    ?: throw IllegalArgumentException("--$name needs a value")
                values[name] = value
                i++
            }
            val dir = values["model-dir"] ?: throw IllegalArgumentException("--model-dir (or DBRX_MODEL_DIR) is required\n${usage()}")
            val d = ServerConfig(Paths.get(dir))
            fun int(name: String, def: Int, min: Int = 0) = values[name]?.let { v ->
                (v.toIntOrNull() ?: throw IllegalArgumentException("--$name: '$v' is not an integer"))
                    .also { require(it >= min) { "--$name must be >= $min, got $it" } }
            } ?: def
            fun bytes(name: String, def: Long) = values[name]?.let { parseBytes(name, it) } ?: def
            return ServerConfig(
                modelDir = d.modelDir,
                modelName = values["model-name"] ?: d.modelName,
                host = values["host"] ?: d.host,
                port = int("port", d.port).also { require(it <= 65535) { "--port must be <= 65535, got $it" } },
                apiKey = values["api-key"]?.takeIf { it.isNotEmpty() },
                device = values["device"]?.let { v ->
                    Device.values().firstOrNull { it.name.equals(v, ignoreCase = true) }
                        ?: throw IllegalArgumentException("--device must be cpu or cuda, got '$v'")
                } ?: d.device,
                deviceId = int("device-id", d.deviceId),
                threads = int("threads", d.threads),
                tensorParallel = int("tensor-parallel", d.tensorParallel, 1),
                expertParallel = int("expert-parallel", d.expertParallel, 1),
                kvCacheBytes = bytes("kv-cache-bytes", d.kvCacheBytes),
                kvBlocks = int("kv-blocks", d.kvBlocks),
                maxContext = int("max-context", d.maxContext),
                engineMaxRunning = values["engine-max-running"]?.let { int("engine-max-running", 0, 1) },
                engineMaxWaiting = values["engine-max-waiting"]?.let { int("engine-max-waiting", 0, 1) },
                maxBatchTokens = values["max-batch-tokens"]?.let { int("max-batch-tokens", 0, 1) },
                maxConcurrent = int("max-concurrent", d.maxConcurrent, 1),
                maxQueue = int("max-queue", d.maxQueue),
                maxBodyBytes = bytes("max-body-bytes", d.maxBodyBytes).also { require(it >= 1024) { "--max-body-bytes must be >= 1024" } },
                maxTokens = int("max-tokens", d.maxTokens, 1),
                maxN = int("max-n", d.maxN, 1),
                maxStop = int("max-stop", d.maxStop, 0),
            )
        }

        private fun parseBytes(name: String, v: String): Long {
            val m = Regex("(?i)^(\\d+)([kmg]?)(i?b)?$").matchEntire(v.trim())
                ?: throw IllegalArgumentException("--$name: '$v' is not a size (e.g. 512m)")
            val shift = when (m.groupValues[2].lowercase()) { "k" -> 10; "m" -> 20; "g" -> 30; else -> 0 }
            return m.groupValues[1].toLong() shl shift
        }
    }
}
