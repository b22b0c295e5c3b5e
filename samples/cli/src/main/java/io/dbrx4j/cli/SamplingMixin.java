package io.dbrx4j.cli;

import io.dbrx4j.SamplingOptions;
import java.util.ArrayList;
import java.util.List;
import picocli.CommandLine.Option;

/** Every sampling option of the engine, as command-line flags. */
final class SamplingMixin {
    @Option(names = "--max-tokens", defaultValue = "256") int maxTokens;
    @Option(names = "--temperature", defaultValue = "0", description = "0 = greedy") float temperature;
    @Option(names = "--top-k", defaultValue = "0") int topK;
    @Option(names = "--top-p", defaultValue = "1") float topP;
    @Option(names = "--min-p", defaultValue = "0") float minP;
    @Option(names = "--repetition-penalty", defaultValue = "1") float repetitionPenalty;
    @Option(names = "--presence-penalty", defaultValue = "0") float presencePenalty;
    @Option(names = "--frequency-penalty", defaultValue = "0") float frequencyPenalty;
    @Option(names = "--seed") Long seed;
    @Option(names = "--stop", description = "stop string (repeatable)") List<String> stop = new ArrayList<>();
    @Option(names = "--ignore-eos", description = "do not stop on eos / <|im_end|>") boolean ignoreEos;
    @Option(names = "--logprobs", defaultValue = "0", description = "report logprobs with N alternatives") int logprobs;

    SamplingOptions build() {
        SamplingOptions.Builder b = SamplingOptions.builder()
            .maxTokens(maxTokens).temperature(temperature).topK(topK).topP(topP).minP(minP)
            .repetitionPenalty(repetitionPenalty).presencePenalty(presencePenalty).frequencyPenalty(frequencyPenalty)
            .stopStrings(stop);
        if (seed != null) b.seed(seed);
        if (ignoreEos) b.stopTokenIds(List.of());
        if (logprobs > 0) b.topLogprobs(logprobs);
        return b.build();
    }
}
