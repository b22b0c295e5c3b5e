package io.dbrx4j.server

import com.fasterxml.jackson.databind.JsonNode

/**
 * Typed, validating reads of request fields. A field that is absent or JSON null reads as null (OpenAI
 * clients send null for "unset"); a present value of the wrong type or out of range is a 400 that names
 * the field and the accepted range.
 */
class JsonFields(private val node: JsonNode, private val prefix: String = "") {
    fun has(name: String): Boolean = node.get(name)?.isNull == false

    fun raw(name: String): JsonNode? = node.get(name)?.takeUnless { it.isNull }

    private fun path(name: String) = prefix + name

    fun string(name: String): String? {
        val v = raw(name) ?: return null
        if (!v.isTextual) throw typeError(name, "a string", v)
        return v.asText()
    }

    fun bool(name: String): Boolean? {
        val v = raw(name) ?: return null
        if (!v.isBoolean) throw typeError(name, "a boolean", v)
        return v.booleanValue()
    }

    /** A finite number in [min, max] (bounds exclusive where asked). */
    fun number(
        name: String,
        min: Double,
        max: Double,
        minExclusive: Boolean = false,
    ): Float? {
        val v = raw(name) ?: return null
        if (!v.isNumber) throw typeError(name, "a number", v)
        val d = v.doubleValue()
        if (!d.isFinite()) throw ApiError.invalid(path(name), "${path(name)} must be a finite number, got $d")
        val low = if (minExclusive) d <= min else d < min
        if (low || d > max) {
            val range = (if (minExclusive) "($min" else "[$min") + ", $max]"
            throw ApiError.invalid(path(name), "${path(name)} must be in $range, got $d")
        }
        return d.toFloat()
    }

    /** An integer in [min, max]. */
    fun int(name: String, min: Long, max: Long): Long? {
        val v = raw(name) ?: return null
        val n = integral(v) ?: throw typeError(name, "an integer", v)
        if (n < min || n > max) throw ApiError.invalid(path(name), "${path(name)} must be in [$min, $max], got $n")
        return n
    }

    fun typeError(name: String, expected: String, got: JsonNode): ApiError =
        ApiError.invalid(path(name), "${path(name)} must be $expected, got ${describe(got)}", code = "invalid_type")

    companion object {
        /** Integers, and numbers such as 5.0 that are integral, as OpenAI's API accepts them. */
        fun integral(v: JsonNode): Long? = when {
            v.isIntegralNumber && v.canConvertToLong() -> v.longValue()
            v.isFloatingPointNumber && v.doubleValue().isFinite() && v.doubleValue() == Math.rint(v.doubleValue()) &&
                Math.abs(v.doubleValue()) < 9.0e15 -> v.doubleValue().toLong()
            else -> null
        }

        fun describe(v: JsonNode): String = when {
            v.isTextual -> "a string"
            v.isBoolean -> "a boolean"
            v.isNumber -> "the number ${v.numberValue()}"
            v.isArray -> "an array"
            v.isObject -> "an object"
            else -> v.nodeType.name.lowercase()
        }
    }
}
