package io.dbrx4j

import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.ObjectMapper
import java.nio.file.Path
import java.nio.file.Paths

/** The bundled models/tiny-dbrx-cl100k checkpoint and its reference outputs. */
object Fixtures {
    val root: Path = Paths.get(System.getProperty("dbrx.root") ?: "..").toAbsolutePath().normalize()
    val modelDir: Path = System.getProperty("dbrx.model.dir")?.let { Paths.get(it) } ?: root.resolve("models/tiny-dbrx-cl100k")

    fun json(name: String): JsonNode = ObjectMapper().readTree(modelDir.resolve(name).toFile())

    fun ints(node: JsonNode): IntArray = IntArray(node.size()) { node[it].asInt() }

    /** A small engine: the fixture needs only a few KV blocks, and the CPU has 2 cores. */
    val options: LoadOptions = LoadOptions.builder().threads(2).kvBlocks(256).build()

    /** One model shared by the generation tests of a JVM (loading is the slow part). */
    val model: DbrxModel by lazy { Dbrx.load(modelDir, options) }
}
