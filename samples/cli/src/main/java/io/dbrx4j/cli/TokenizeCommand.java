package io.dbrx4j.cli;

import io.dbrx4j.Tokenizer;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.concurrent.Callable;
import java.util.stream.Collectors;
import picocli.CommandLine.ArgGroup;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/** Token ids of a text with the checkpoint's tokenizer; needs no weights. */
@Command(name = "tokenize", mixinStandardHelpOptions = true, description = "Print the token ids of a text.")
final class TokenizeCommand implements Callable<Integer> {
    @Option(names = "--model", required = true, description = "checkpoint directory (its tokenizer.json)")
    Path model;

    static final class Input {
        @Option(names = "--file", description = "UTF-8 text file, tokenized exactly as it is") Path file;
        @Option(names = "--text", description = "text to tokenize") String text;
    }

    @ArgGroup(exclusive = true, multiplicity = "1") Input input;

    @Option(names = "--json", description = "print the ids as a JSON array")
    boolean json;

    @Override
    public Integer call() throws Exception {
        String text = input.text != null ? input.text : readUtf8(input.file);
        int[] ids;
        try (Tokenizer tokenizer = Tokenizer.load(model)) {
            ids = tokenizer.encode(text);
        }
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        String joined = Arrays.stream(ids).mapToObj(Integer::toString).collect(Collectors.joining(json ? "," : " "));
        out.println(json ? "[" + joined + "]" : joined);
        return 0;
    }

    /** Strict UTF-8: a file that is not valid UTF-8 is an error, not silently replaced characters. */
    private static String readUtf8(Path file) throws Exception {
        return StandardCharsets.UTF_8.newDecoder()
            .onMalformedInput(CodingErrorAction.REPORT)
            .onUnmappableCharacter(CodingErrorAction.REPORT)
            .decode(ByteBuffer.wrap(Files.readAllBytes(file)))
            .toString();
    }
}
