package io.dbrx4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import org.junit.jupiter.api.Test;

/** The SDK from plain Java: builders, try-with-resources, java.util.stream, CompletableFuture. */
class JavaApiTest {
    @Test
    void javaCallersSeePlainJavaTypes() throws Exception {
        DbrxModel model = Fixtures.INSTANCE.getModel();
        SamplingOptions options = SamplingOptions.builder()
            .maxTokens(6)
            .stopTokenIds(List.of())
            .build();
        Prompt prompt = Prompt.ids(new int[] {34583});

        List<Integer> ids;
        try (TokenStream tokens = model.stream(prompt, options)) {
            ids = tokens.stream().map(Token::getId).collect(Collectors.toList());
        }
        assertEquals(6, ids.size());

        CompletableFuture<Completion> future = model.completeAsync(prompt, options);
        Completion completion = future.get(60, TimeUnit.SECONDS);
        assertEquals(ids.size(), completion.getTokens().size());
        assertEquals(FinishReason.LENGTH, completion.getFinishReason());
        assertNull(completion.getPromptLogits());

        float[] logits = model.complete(prompt, options.toBuilder().promptLogits(true).build()).getPromptLogits();
        assertEquals(model.getInfo().getVocabSize(), logits.length);

        Completion chat = model.complete(
            Prompt.chat(ChatMessage.system("Be terse."), ChatMessage.user("Hi")), SamplingOptions.greedy(3));
        assertTrue(chat.getPromptTokens() > 0);
        assertTrue(model.getInfo().getExperts() == 16);
    }
}
