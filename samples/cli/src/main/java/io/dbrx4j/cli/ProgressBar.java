package io.dbrx4j.cli;

import java.io.PrintStream;

/** A one-line text progress bar on stderr, redrawn with a carriage return. */
final class ProgressBar {
    private static final int WIDTH = 40;
    private final String label;
    private final PrintStream out;
    private final long start = System.nanoTime();
    private int lastPercent = -1;

    ProgressBar(String label, PrintStream out) {
        this.label = label;
        this.out = out;
    }

    void update(float fraction) {
        int percent = Math.round(Math.max(0f, Math.min(1f, fraction)) * 100);
        if (percent == lastPercent) return;
        lastPercent = percent;
        int filled = percent * WIDTH / 100;
        out.print("\r" + label + " [" + "#".repeat(filled) + " ".repeat(WIDTH - filled) + "] " + percent + "%");
        out.flush();
    }

    void done() {
        if (lastPercent >= 0) out.printf(" (%.1f s)%n", (System.nanoTime() - start) / 1e9);
    }
}
