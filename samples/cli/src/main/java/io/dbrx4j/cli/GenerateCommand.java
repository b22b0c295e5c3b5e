package io.dbrx4j.cli;

import com.fasterxml.jackson.databind.ObjectMapper;
import io.dbrx4j.ChatMessage;
import io.dbrx4j.DbrxModel;
import io.dbrx4j.Prompt;
import io.dbrx4j.Token;
import io.dbrx4j.TokenStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Callable;
import picocli.CommandLine.ArgGroup;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;

@Command(name = "generate", mixinStandardHelpOptions = true, description = "Stream a continuation of a prompt.")
final class GenerateCommand implements Callable<Integer> {
    @Mixin ModelOptions modelOptions;
    @Mixin SamplingMixin sampling;

    static final class Input {
        @Option(names = "--prompt", description = "prompt text") String text;
        @Option(names = "--file", description = "read the prompt from a UTF-8 file") Path file;
    }

    @ArgGroup(exclusive = true, multiplicity = "1") Input input;

    @Option(names = "--chat", description = "send the prompt as a user message through the chat template")
    boolean chat;

    @Option(names = "--json", description = "print {ids, text, finish_reason, logprobs} instead of streaming text")
    boolean json;

    @Override
    public Integer call() throws Exception {
        String text = input.text != null ? input.text : Files.readString(input.file, StandardCharsets.UTF_8);
        Prompt prompt = chat ? Prompt.chat(ChatMessage.user(text)) : Prompt.text(text);
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        try (DbrxModel model = modelOptions.load()) {
            List<Integer> ids = new ArrayList<>();
            List<Float> logprobs = new ArrayList<>();
            StringBuilder all = new StringBuilder();
            try (TokenStream tokens = model.stream(prompt, sampling.build())) {
                while (tokens.hasNext()) {
                    Token t = tokens.next();
                    ids.add(t.getId());
                    logprobs.add(t.getLogprob());
                    all.append(t.getText());
                    if (!json) out.print(t.getText());
                }
                if (json) {
                    Map<String, Object> result = new LinkedHashMap<>();
                    result.put("ids", ids);
                    result.put("text", all.toString());
                    result.put("finish_reason", String.valueOf(tokens.finishReason()).toLowerCase(java.util.Locale.ROOT));
                    if (sampling.logprobs > 0) result.put("logprobs", logprobs);
                    out.println(new ObjectMapper().writeValueAsString(result));
                } else {
                    out.println();
                }
            }
        }
        return 0;
    }
}
