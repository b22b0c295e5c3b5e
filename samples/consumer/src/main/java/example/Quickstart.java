package example;

import io.dbrx4j.ChatMessage;
import io.dbrx4j.Completion;
import io.dbrx4j.Dbrx;
import io.dbrx4j.DbrxModel;
import io.dbrx4j.LoadOptions;
import io.dbrx4j.Prompt;
import io.dbrx4j.SamplingOptions;
import io.dbrx4j.TokenStream;

/** Loads a checkpoint, streams a chat answer, then runs one completion asynchronously. */
public final class Quickstart {
    public static void main(String[] args) throws Exception {
        String dir = args.length > 0 ? args[0] : "models/tiny-dbrx-cl100k";
        System.out.println("dbrx4j runtime " + Dbrx.version() + ", CUDA available: " + Dbrx.cudaAvailable());
        LoadOptions load = LoadOptions.builder().threads(2).kvBlocks(256)
            .onProgress(p -> System.out.printf("\rloading %3.0f%%", p * 100)).build();
        try (DbrxModel model = Dbrx.load(dir, load)) {
            System.out.println("\n" + model.getInfo());
            SamplingOptions options = SamplingOptions.builder().temperature(0.7f).topP(0.9f).seed(42).maxTokens(16).build();
            try (TokenStream tokens = model.stream(Prompt.chat(ChatMessage.user("What is 2+2?")), options)) {
                tokens.forEachRemaining(t -> System.out.print(t.getText()));
                System.out.println("\n[" + tokens.finishReason() + "]");
            }
            Completion c = model.completeAsync(Prompt.text("hello world"), SamplingOptions.greedy(8)).get();
            System.out.println(c.getTokens().size() + " tokens, finish " + c.getFinishReason());
            if (c.getTokens().isEmpty()) throw new IllegalStateException("no tokens generated");
        }
    }
}
