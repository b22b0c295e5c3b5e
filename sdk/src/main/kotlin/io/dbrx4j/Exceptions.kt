package io.dbrx4j

/**
 * Base of every error the SDK reports. Unchecked, so Java callers are not forced into try/catch and
 * Kotlin callers see no difference; [status] is the native status name ("INVALID_ARGUMENT", ...) or
 * "CLOSED"/"TEMPLATE" for failures raised on the JVM side, and [message] carries the native text.
 */
open class DbrxException(val status: String, message: String, cause: Throwable? = null) :
    RuntimeException(message, cause)

/** A parameter was out of range or malformed (native DBRX_ERR_INVALID_ARGUMENT). */
class DbrxInvalidArgumentException(message: String, cause: Throwable? = null) :
    DbrxException("INVALID_ARGUMENT", message, cause)

/** The checkpoint directory is missing, unreadable or malformed (BAD_CHECKPOINT, IO). */
class DbrxBadCheckpointException(status: String, message: String, cause: Throwable? = null) :
    DbrxException(status, message, cause)

/** Host or device memory ran out (OUT_OF_MEMORY). */
class DbrxOutOfMemoryException(message: String) : DbrxException("OUT_OF_MEMORY", message)

/** Valid, but not supported by this build or device: for instance CUDA without a GPU (UNSUPPORTED). */
class DbrxUnsupportedException(message: String) : DbrxException("UNSUPPORTED", message)

/** The engine refused or failed the work: QUEUE_FULL, ENGINE_DEAD, INTERNAL, a failed request. */
class DbrxEngineException(status: String, message: String) : DbrxException(status, message)

/** The model (or a stream of it) was used after close(). */
class DbrxClosedException(message: String) : DbrxException("CLOSED", message)

/** The chat template failed to render, or exceeded its time or size budget. */
class DbrxTemplateException(message: String, cause: Throwable? = null) :
    DbrxException("TEMPLATE", message, cause)

/** The native library of this platform could not be loaded. */
class DbrxNativeLibraryException(message: String, cause: Throwable? = null) :
    DbrxException("NATIVE_LIBRARY", message, cause)
