package io.dbrx4j.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import picocli.CommandLine;

class CliTest {
    private static final Path MODEL = Paths.get(System.getProperty("dbrx.model.dir", "../../models/tiny-dbrx-cl100k"));

    /** Runs the command line with stdout captured; returns {exit code, stdout}. */
    private static Object[] run(String... args) {
        PrintStream saved = System.out;
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        System.setOut(new PrintStream(buf, true, StandardCharsets.UTF_8));
        try {
            int code = new CommandLine(new Main()).execute(args);
            return new Object[] {code, buf.toString(StandardCharsets.UTF_8)};
        } finally {
            System.setOut(saved);
        }
    }

    @Test
    void tokenizeFileJsonPrintsTheIdsOfEveryReferenceCase(@TempDir Path tmp) throws Exception {
        JsonNode cases = new ObjectMapper().readTree(MODEL.resolve("tokenizer_reference.json").toFile()).get("tokenizer_cases");
        for (JsonNode c : cases) {
            Path file = tmp.resolve("text.txt");
            Files.writeString(file, c.get("text").asText(), StandardCharsets.UTF_8);
            Object[] r = run("tokenize", "--model", MODEL.toString(), "--file", file.toString(), "--json");
            assertEquals(0, r[0]);
            assertEquals(c.get("ids").toString(), ((String) r[1]).trim(), c.get("text").asText());
        }
    }

    @Test
    void evalAgreesWithTheReference(@TempDir Path tmp) throws Exception {
        Path out = tmp.resolve("eval.json");
        Object[] r = run("eval", "--model", MODEL.toString(), "--cases", MODEL.resolve("reference.json").toString(),
            "--out", out.toString(), "--threads", "2", "--quiet", "--concurrency", "3");
        assertEquals(0, r[0]);
        JsonNode cases = new ObjectMapper().readTree(out.toFile()).get("cases");
        JsonNode reference = new ObjectMapper().readTree(MODEL.resolve("reference.json").toFile()).get("cases");
        int vocab = new ObjectMapper().readTree(MODEL.resolve("config.json").toFile()).get("vocab_size").asInt();
        assertEquals(3, cases.size());
        for (int i = 0; i < cases.size(); i++) {
            JsonNode logits = cases.get(i).get("last_logits");
            assertEquals(vocab, logits.size(), "case " + i + ": one last logit per vocabulary entry");
            assertEquals(reference.get(i).get("greedy_ids").size(), cases.get(i).get("greedy_ids").size());
            assertEquals(argmax(logits), cases.get(i).get("greedy_ids").get(0).asInt(),
                "case " + i + ": the first greedy id is the argmax of last_logits");
        }
    }

    private static int argmax(JsonNode values) {
        int best = 0;
        for (int v = 1; v < values.size(); v++) if (values.get(v).asDouble() > values.get(best).asDouble()) best = v;
        return best;
    }

    @Test
    void generateJson() throws Exception {
        Object[] r = run("generate", "--model", MODEL.toString(), "--prompt", "hello world", "--max-tokens", "4",
            "--ignore-eos", "--json", "--quiet", "--threads", "2", "--logprobs", "2");
        assertEquals(0, r[0]);
        JsonNode result = new ObjectMapper().readTree((String) r[1]);
        assertEquals(4, result.get("ids").size());
        assertEquals("length", result.get("finish_reason").asText());
        assertTrue(result.get("logprobs").get(0).asDouble() <= 0);
    }
}
