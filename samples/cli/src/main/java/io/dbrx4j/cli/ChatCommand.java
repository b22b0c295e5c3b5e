package io.dbrx4j.cli;

import io.dbrx4j.ChatMessage;
import io.dbrx4j.DbrxModel;
import io.dbrx4j.FinishReason;
import io.dbrx4j.Prompt;
import io.dbrx4j.Token;
import io.dbrx4j.TokenStream;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.Callable;
import java.util.concurrent.atomic.AtomicReference;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;
import sun.misc.Signal;

/**
 * Interactive chat. Answers stream as they are generated; Ctrl-C while an answer streams cancels that
 * answer (the native request is cancelled, the conversation goes on); Ctrl-C at the prompt, or an empty
 * stdin, ends the program.
 */
@Command(name = "chat", mixinStandardHelpOptions = true, description = "Interactive streaming chat.")
final class ChatCommand implements Callable<Integer> {
    @Mixin ModelOptions modelOptions;
    @Mixin SamplingMixin sampling;

    @Option(names = "--system", description = "system prompt (default: the checkpoint's, DBRX's own)")
    String system;

    @Override
    public Integer call() throws Exception {
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        AtomicReference<TokenStream> answering = new AtomicReference<>();
        Signal.handle(new Signal("INT"), sig -> {
            TokenStream current = answering.get();
            if (current != null) {
                current.close();
            } else {
                out.println();
                System.exit(130);
            }
        });
        try (DbrxModel model = modelOptions.load()) {
            List<ChatMessage> history = new ArrayList<>();
            if (system != null) history.add(ChatMessage.system(system));
            BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
            out.println("dbrx4j chat: Ctrl-C cancels an answer; Ctrl-D or Ctrl-C at the prompt quits.");
            while (true) {
                out.print("> ");
                String line = in.readLine();
                if (line == null) break;
                if (line.isBlank()) continue;
                history.add(ChatMessage.user(line));
                StringBuilder answer = new StringBuilder();
                try (TokenStream tokens = model.stream(Prompt.chat(history), sampling.build())) {
                    answering.set(tokens);
                    while (tokens.hasNext()) {
                        Token t = tokens.next();
                        answer.append(t.getText());
                        out.print(t.getText());
                    }
                    if (tokens.finishReason() == FinishReason.CANCELLED) out.print(" [cancelled]");
                } finally {
                    answering.set(null);
                }
                out.println();
                history.add(ChatMessage.assistant(answer.toString()));
            }
        }
        return 0;
    }
}
