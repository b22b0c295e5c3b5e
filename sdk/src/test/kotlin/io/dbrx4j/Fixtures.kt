package io.dbrx4j

import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.ObjectMapper
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.Paths

/** The bundled models/tiny-dbrx-cl100k checkpoint and its reference outputs. */
object Fixtures {
    val root: Path = Paths.get(System.getProperty("dbrx.root") ?: "..").toAbsolutePath().normalize()
    val modelDir: Path = System.getProperty("dbrx.model.dir")?.let { Paths.get(it) } ?: root.resolve("models/tiny-dbrx-cl100k")

    fun json(name: String): JsonNode = ObjectMapper().readTree(modelDir.resolve(name).toFile())

    fun ints(node: JsonNode): IntArray = IntArray(node.size()) { node[it].asInt() }

    /**
     * The F32 tensor [name] of a safetensors file in the model directory: an 8-byte little-endian header
     * length, the JSON header (dtype, shape, data_offsets relative to the data), then the data.
     */
    fun f32Tensor(file: String, name: String): FloatArray {
        val bytes = Files.readAllBytes(modelDir.resolve(file))
        val buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
        val headerLen = buf.getLong(0)
        require(headerLen in 2..(bytes.size - 8L)) { "$file: header length $headerLen out of range" }
        val header = ObjectMapper().readTree(String(bytes, 8, headerLen.toInt(), Charsets.UTF_8))
        val entry = requireNotNull(header[name]) { "$file has no tensor $name" }
        require(entry["dtype"].asText() == "F32") { "$file: $name is ${entry["dtype"]}, not F32" }
        val begin = 8 + headerLen + entry["data_offsets"][0].asLong()
        val end = 8 + headerLen + entry["data_offsets"][1].asLong()
        val count = entry["shape"].fold(1L) { n, d -> n * d.asLong() }
        require(end - begin == count * 4 && end <= bytes.size) { "$file: $name data_offsets do not fit its shape" }
        return FloatArray(count.toInt()) { buf.getFloat((begin + 4L * it).toInt()) }
    }

    /** A small engine: the fixture needs only a few KV blocks, and the CPU has 2 cores. */
    val options: LoadOptions = LoadOptions.builder().threads(2).kvBlocks(256).build()

    /** One model shared by the generation tests of a JVM (loading is the slow part). */
    val model: DbrxModel by lazy { Dbrx.load(modelDir, options) }
}
