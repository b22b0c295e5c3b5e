package io.dbrx4j

import io.dbrx4j.internal.Native
import io.dbrx4j.internal.NativeEngine
import io.dbrx4j.runtime.global.dbrx
import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.Paths

/** Entry point: load a checkpoint. */
object Dbrx {
    /**
     * Loads a Hugging Face DBRX checkpoint directory (config.json, safetensors shards, tokenizer.json,
     * tokenizer_config.json) and starts its engine. Weights are mapped by the native runtime.
     * Throws [DbrxBadCheckpointException] for a missing or malformed checkpoint,
     * [DbrxUnsupportedException] for CUDA without a GPU, [DbrxOutOfMemoryException], ...
     */
    @JvmStatic
    @JvmOverloads
    fun load(path: Path, options: LoadOptions = LoadOptions.DEFAULTS): DbrxModel {
        if (!Files.isDirectory(path)) throw DbrxBadCheckpointException("IO", "not a checkpoint directory: $path")
        val template = ChatTemplate.load(path, options.templateTimeout)
        val tokenizer = if (Files.exists(path.resolve("tokenizer.json"))) Tokenizer.load(path) else null
        try {
            if (options.device == Device.CUDA) {
                Native.ensureLoaded()
                if (!dbrx.dbrx_cuda_available()) {
                    throw DbrxUnsupportedException(
                        "CUDA was requested but this runtime has no CUDA backend or sees no GPU " +
                            "(use the linux-x86_64-cuda classifier on a machine with an NVIDIA GPU, or Device.CPU)",
                    )
                }
            }
            return DbrxModel(path, NativeEngine.open(path, options), tokenizer, template)
        } catch (t: Throwable) {
            tokenizer?.close()
            throw t
        }
    }

    @JvmStatic
    @JvmOverloads
    fun load(path: String, options: LoadOptions = LoadOptions.DEFAULTS): DbrxModel = load(Paths.get(path), options)

    /**
     * For every process but the first of a model spread over several processes (hosts): loads this
     * process's shards ([LoadOptions.Builder.nodes], [LoadOptions.Builder.nodeRank] > 0,
     * [LoadOptions.Builder.rendezvous]) and runs the steps process 0's engine sends until process 0
     * closes its model; blocks the calling thread meanwhile. Throws [DbrxEngineException] (status ENGINE_DEAD) when
     * process 0 goes away or a step fails here, [DbrxInvalidArgumentException] on process 0 or a
     * single process (which serve requests through [load] instead).
     */
    @JvmStatic
    fun serveRank(path: Path, options: LoadOptions) {
        if (!Files.isDirectory(path)) throw DbrxBadCheckpointException("IO", "not a checkpoint directory: $path")
        NativeEngine.serve(path, options)
    }

    /** The native runtime's version. */
    @JvmStatic
    fun version(): String {
        Native.ensureLoaded()
        return dbrx.dbrx_version().string
    }

    /** True when the loaded runtime has the CUDA backend and sees a GPU. */
    @JvmStatic
    fun cudaAvailable(): Boolean {
        Native.ensureLoaded()
        return dbrx.dbrx_cuda_available()
    }
}
