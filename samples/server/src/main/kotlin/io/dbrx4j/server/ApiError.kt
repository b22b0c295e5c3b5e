package io.dbrx4j.server

/**
 * An error answered in OpenAI's shape: {"error":{"message","type","param","code"}}.
 * [type] follows OpenAI's vocabulary (invalid_request_error, authentication_error, ...).
 */
class ApiError(
    val status: Int,
    override val message: String,
    val type: String = typeFor(status),
    val param: String? = null,
    val code: String? = null,
) : RuntimeException(message) {
    companion object {
        fun typeFor(status: Int) = when (status) {
            400, 404, 405, 413 -> "invalid_request_error"
            401 -> "authentication_error"
            429 -> "rate_limit_error"
            503 -> "service_unavailable"
            else -> "server_error"
        }

        fun invalid(param: String?, message: String, code: String = "invalid_value") =
            ApiError(400, message, param = param, code = code)

        fun unsupported(param: String, message: String) =
            ApiError(400, message, param = param, code = "unsupported_parameter")
    }
}
