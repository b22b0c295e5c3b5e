package io.dbrx4j.cli;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import io.dbrx4j.Completion;
import io.dbrx4j.DbrxModel;
import io.dbrx4j.EngineStats;
import io.dbrx4j.Prompt;
import io.dbrx4j.SamplingOptions;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Callable;
import java.util.concurrent.CompletableFuture;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;

/**
 * The last prompt position's logits and the greedy continuation of every case of a reference.json (as
 * `dbrx eval` runs them: through eos, as many tokens as the case's greedy_ids), written in `dbrx eval`'s
 * format: {"cases":[{"last_logits":[...],"greedy_ids":[...]}],"stats":{...}}. Where the file has
 * greedy_ids and greedy_margins, agreement up to the first margin below --tolerance is checked.
 */
@Command(name = "eval", mixinStandardHelpOptions = true,
    description = "Last prompt logits and greedy ids of every case of a reference.json.")
final class EvalCommand implements Callable<Integer> {
    @Mixin ModelOptions modelOptions;

    @Option(names = "--cases", required = true, description = "reference.json with cases[].prompt_ids")
    Path cases;

    @Option(names = "--out", description = "write the results here (default: stdout)")
    Path out;

    @Option(names = "--concurrency", defaultValue = "1", description = "cases in flight at once")
    int concurrency;

    @Option(names = "--tolerance", defaultValue = "1e-2", description = "reference margins below this are not compared")
    double tolerance;

    @Override
    public Integer call() throws Exception {
        ObjectMapper json = new ObjectMapper();
        JsonNode reference = json.readTree(cases.toFile()).get("cases");
        List<Completion> results = new ArrayList<>();
        EngineStats stats;
        try (DbrxModel model = modelOptions.load()) {
            List<CompletableFuture<Completion>> window = new ArrayList<>();
            for (int i = 0; i < reference.size(); i++) {
                JsonNode c = reference.get(i);
                int n = c.has("greedy_ids") ? Math.max(1, c.get("greedy_ids").size()) : 1;
                SamplingOptions greedy = SamplingOptions.builder().maxTokens(n).stopTokenIds(List.of()).promptLogits(true).build();
                window.add(model.completeAsync(Prompt.ids(ints(c.get("prompt_ids"))), greedy));
                if (window.size() >= concurrency) drain(window, results);
            }
            drain(window, results);
            stats = model.stats();
        }
        List<Map<String, Object>> rows = new ArrayList<>();
        int mismatches = 0;
        for (int i = 0; i < results.size(); i++) {
            Completion c = results.get(i);
            float[] logits = c.getPromptLogits();
            if (logits == null) throw new IllegalStateException("case " + i + " ended before its first token");
            Map<String, Object> row = new LinkedHashMap<>();
            row.put("last_logits", logits);
            row.put("greedy_ids", c.getTokenIds());
            rows.add(row);
            mismatches += compare(reference.get(i), c.getTokenIds(), i);
        }
        Map<String, Object> doc = new LinkedHashMap<>();
        doc.put("cases", rows);
        doc.put("stats", statsOf(stats));
        if (out != null) json.writeValue(out.toFile(), doc);
        else System.out.println(json.writeValueAsString(doc));
        System.err.printf("dbrx4j eval: %d cases, %d disagree with the reference%n", results.size(), mismatches);
        return mismatches == 0 ? 0 : 2;
    }

    private static void drain(List<CompletableFuture<Completion>> window, List<Completion> results) {
        for (CompletableFuture<Completion> f : window) results.add(f.join());
        window.clear();
    }

    /** The engine counters `dbrx eval` reports. */
    private static Map<String, Object> statsOf(EngineStats s) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("preemptions", s.getPreemptions());
        m.put("prefix_hit_tokens", s.getPrefixHitTokens());
        m.put("prefix_query_tokens", s.getPrefixQueryTokens());
        m.put("steps", s.getSteps());
        m.put("blocks_total", s.getBlocksTotal());
        return m;
    }

    private int compare(JsonNode c, int[] got, int index) {
        if (!c.has("greedy_ids") || !c.has("greedy_margins")) return 0;
        int[] expected = ints(c.get("greedy_ids"));
        JsonNode margins = c.get("greedy_margins");
        for (int k = 0; k < expected.length && k < margins.size() && margins.get(k).asDouble() >= tolerance; k++) {
            if (k >= got.length || got[k] != expected[k]) {
                System.err.printf("case %d: step %d gives %s, the reference %d%n", index, k,
                    k < got.length ? Integer.toString(got[k]) : "nothing", expected[k]);
                return 1;
            }
        }
        return 0;
    }

    private static int[] ints(JsonNode node) {
        int[] out = new int[node.size()];
        for (int i = 0; i < out.length; i++) out[i] = node.get(i).asInt();
        return out;
    }
}
