package io.dbrx4j.internal

import io.dbrx4j.DbrxBadCheckpointException
import io.dbrx4j.DbrxEngineException
import io.dbrx4j.DbrxException
import io.dbrx4j.DbrxInvalidArgumentException
import io.dbrx4j.DbrxNativeLibraryException
import io.dbrx4j.DbrxOutOfMemoryException
import io.dbrx4j.DbrxUnsupportedException
import io.dbrx4j.runtime.global.dbrx
import org.bytedeco.javacpp.Loader

/** Loads the JNI library once and turns native statuses into typed exceptions. */
internal object Native {
    private val loadError: Throwable? = try {
        Loader.load(dbrx::class.java)
        null
    } catch (e: UnsatisfiedLinkError) {
        e
    } catch (e: ExceptionInInitializerError) {
        e
    }

    /** Throws [DbrxNativeLibraryException] when this platform's runtime jar is missing or unloadable. */
    fun ensureLoaded() {
        loadError?.let {
            throw DbrxNativeLibraryException(
                "cannot load the dbrx4j native library for ${Loader.getPlatform()}: ${it.message} " +
                    "(add io.dbrx4j:dbrx4j-runtime with classifier linux-x86_64, or linux-x86_64-cuda, to the class path)",
                it,
            )
        }
    }

    fun lastError(): String = dbrx.dbrx_last_error().string

    fun statusName(status: Int): String = dbrx.dbrx_status_name(status).string.removePrefix("DBRX_ERR_")

    /** Throws the exception for [status] (when not OK) with the thread's last native error text. */
    fun check(status: Int, what: String) {
        if (status != dbrx.DBRX_OK) throw error(status, what, lastError())
    }

    fun error(status: Int, what: String, nativeMessage: String): DbrxException {
        val message = if (nativeMessage.isEmpty()) "$what failed (${statusName(status)})" else "$what: $nativeMessage"
        return when (status) {
            dbrx.DBRX_ERR_INVALID_ARGUMENT -> DbrxInvalidArgumentException(message)
            dbrx.DBRX_ERR_BAD_CHECKPOINT, dbrx.DBRX_ERR_IO -> DbrxBadCheckpointException(statusName(status), message)
            dbrx.DBRX_ERR_OUT_OF_MEMORY -> DbrxOutOfMemoryException(message)
            dbrx.DBRX_ERR_UNSUPPORTED -> DbrxUnsupportedException(message)
            else -> DbrxEngineException(statusName(status), message)
        }
    }
}
