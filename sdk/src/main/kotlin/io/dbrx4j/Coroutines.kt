@file:JvmName("DbrxCoroutines")

package io.dbrx4j

import kotlinx.coroutines.future.await

/** Kotlin: the whole generation, suspending; cancelling the coroutine cancels the native request. */
@JvmSynthetic
suspend fun DbrxModel.completion(prompt: Prompt, options: SamplingOptions = SamplingOptions.DEFAULTS): Completion =
    completeAsync(prompt, options).await()
