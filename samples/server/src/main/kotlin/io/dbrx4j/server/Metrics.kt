package io.dbrx4j.server

import io.dbrx4j.EngineStats
import java.util.concurrent.ConcurrentHashMap
import java.util.concurrent.atomic.DoubleAdder
import java.util.concurrent.atomic.LongAdder

/** A Prometheus histogram (cumulative buckets, sum, count); lock-free. */
class Histogram(val name: String, val help: String, private val bounds: DoubleArray) {
    private val counts = Array(bounds.size + 1) { LongAdder() }
    private val sum = DoubleAdder()
    private val total = LongAdder()

    fun observe(seconds: Double) {
        var i = 0
        while (i < bounds.size && seconds > bounds[i]) i++
        counts[i].increment()
        sum.add(seconds)
        total.increment()
    }

    val count: Long get() = total.sum()

    fun render(out: StringBuilder) {
        out.append("# HELP ").append(name).append(' ').append(help).append('\n')
        out.append("# TYPE ").append(name).append(" histogram\n")
        var cumulative = 0L
        for (i in bounds.indices) {
            cumulative += counts[i].sum()
            out.append(name).append("_bucket{le=\"").append(bounds[i]).append("\"} ").append(cumulative).append('\n')
        }
        cumulative += counts[bounds.size].sum()
        out.append(name).append("_bucket{le=\"+Inf\"} ").append(cumulative).append('\n')
        out.append(name).append("_sum ").append(sum.sum()).append('\n')
        out.append(name).append("_count ").append(cumulative).append('\n')
    }
}

/**
 * The server's counters, rendered in the Prometheus text format (version 0.0.4) together with the
 * engine's own (KV blocks, preemptions, engine queue).
 */
class Metrics {
    private val requests = ConcurrentHashMap<Pair<String, Int>, LongAdder>()
    val promptTokens = LongAdder()
    val completionTokens = LongAdder()
    val disconnects = LongAdder()

    val timeToFirstToken = Histogram(
        "dbrx_time_to_first_token_seconds", "Time from a request's arrival to its first generated token.",
        doubleArrayOf(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    )
    val interTokenLatency = Histogram(
        "dbrx_inter_token_latency_seconds", "Time between consecutive tokens of one choice.",
        doubleArrayOf(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    )
    val requestDuration = Histogram(
        "dbrx_request_duration_seconds", "Time from a generation request's arrival to its last byte.",
        doubleArrayOf(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    )

    fun countRequest(path: String, status: Int) {
        requests.computeIfAbsent(path to status) { LongAdder() }.increment()
    }

    fun render(running: Int, queued: Int, engine: EngineStats?): String = buildString {
        append("# HELP dbrx_requests_total HTTP requests answered, by endpoint and status.\n")
        append("# TYPE dbrx_requests_total counter\n")
        for ((key, n) in requests.entries.sortedWith(compareBy({ it.key.first }, { it.key.second }))) {
            append("dbrx_requests_total{endpoint=\"").append(escape(key.first)).append("\",status=\"")
                .append(key.second).append("\"} ").append(n.sum()).append('\n')
        }
        counter("dbrx_prompt_tokens_total", "Prompt tokens of admitted generation requests.", promptTokens.sum())
        counter("dbrx_generation_tokens_total", "Tokens generated and delivered (or collected) for clients.", completionTokens.sum())
        counter("dbrx_client_disconnects_total", "Streams whose client went away before the end (request cancelled).", disconnects.sum())
        timeToFirstToken.render(this)
        interTokenLatency.render(this)
        requestDuration.render(this)
        gauge("dbrx_requests_running", "HTTP generation requests holding a slot.", running.toLong())
        gauge("dbrx_queue_depth", "HTTP generation requests waiting for a slot.", queued.toLong())
        if (engine != null) {
            gauge("dbrx_engine_running", "Sequences in the engine's running batch.", engine.running.toLong())
            gauge("dbrx_engine_waiting", "Sequences queued in the engine (new or preempted).", engine.waiting.toLong())
            gauge("dbrx_kv_blocks_total", "KV-cache blocks in the pool.", engine.blocksTotal.toLong())
            gauge("dbrx_kv_blocks_used", "KV-cache blocks referenced by a request.", engine.blocksUsed.toLong())
            gauge("dbrx_kv_blocks_cached", "Unreferenced KV-cache blocks holding a cached prefix.", engine.blocksCached.toLong())
            gauge("dbrx_kv_blocks_free", "Unreferenced KV-cache blocks holding nothing.", engine.blocksFree.toLong())
            counter("dbrx_preemptions_total", "Sequences preempted for lack of KV blocks.", engine.preemptions)
            counter("dbrx_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache.", engine.prefixQueryTokens)
            counter("dbrx_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache.", engine.prefixHitTokens)
            counter("dbrx_engine_steps_total", "Engine steps run.", engine.steps)
            counter("dbrx_engine_generated_tokens_total", "Tokens the engine generated (including cancelled requests).", engine.generatedTokens)
        }
    }

    private fun StringBuilder.counter(name: String, help: String, value: Long) = metric(name, "counter", help, value)
    private fun StringBuilder.gauge(name: String, help: String, value: Long) = metric(name, "gauge", help, value)

    private fun StringBuilder.metric(name: String, type: String, help: String, value: Long) {
        append("# HELP ").append(name).append(' ').append(help).append('\n')
        append("# TYPE ").append(name).append(' ').append(type).append('\n')
        append(name).append(' ').append(value).append('\n')
    }

    private fun escape(s: String) = s.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
}
