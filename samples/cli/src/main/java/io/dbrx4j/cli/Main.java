package io.dbrx4j.cli;

import io.dbrx4j.DbrxException;
import picocli.CommandLine;
import picocli.CommandLine.Command;

/** dbrx4j: generate, chat, tokenize and eval DBRX checkpoints from the JVM. */
@Command(
    name = "dbrx4j",
    mixinStandardHelpOptions = true,
    version = "dbrx4j 0.1.0",
    description = "Run DBRX checkpoints through the dbrx4j SDK.",
    subcommands = {GenerateCommand.class, ChatCommand.class, TokenizeCommand.class, EvalCommand.class})
public final class Main {
    public static void main(String[] args) {
        CommandLine cli = new CommandLine(new Main());
        // SDK errors carry the native message: print it, not a stack trace.
        cli.setExecutionExceptionHandler((e, cmd, parsed) -> {
            if (e instanceof DbrxException) {
                cmd.getErr().println("error: " + e.getMessage());
                return 1;
            }
            throw e;
        });
        System.exit(cli.execute(args));
    }
}
