package io.dbrx4j.cli;

import io.dbrx4j.Dbrx;
import io.dbrx4j.DbrxModel;
import io.dbrx4j.Device;
import io.dbrx4j.LoadOptions;
import java.nio.file.Path;
import picocli.CommandLine.Option;

/** Where the checkpoint is and how to run it; shared by the commands that load a model. */
final class ModelOptions {
    @Option(names = "--model", required = true, description = "Hugging Face DBRX checkpoint directory")
    Path model;

    @Option(names = "--device", defaultValue = "cpu", description = "cpu or cuda (default: ${DEFAULT-VALUE})")
    String device;

    @Option(names = "--device-id", defaultValue = "0", description = "first CUDA device")
    int deviceId;

    @Option(names = "--tp", defaultValue = "1", description = "tensor-parallel ranks")
    int tensorParallel;

    @Option(names = "--threads", defaultValue = "0", description = "CPU worker threads (0 = all cores)")
    int threads;

    @Option(names = "--kv-cache-bytes", defaultValue = "0", description = "KV cache size in bytes (0 = a share of free memory)")
    long kvCacheBytes;

    @Option(names = "--max-batch-tokens", description = "tokens per engine step")
    Integer maxBatchTokens;

    @Option(names = "--quiet", description = "no load progress bar")
    boolean quiet;

    DbrxModel load() {
        LoadOptions.Builder b = LoadOptions.builder()
            .device(Device.valueOf(device.toUpperCase(java.util.Locale.ROOT)))
            .deviceId(deviceId)
            .tensorParallel(tensorParallel)
            .threads(threads)
            .kvCacheBytes(kvCacheBytes);
        if (maxBatchTokens != null) b.maxBatchTokens(maxBatchTokens);
        ProgressBar bar = quiet ? null : new ProgressBar("loading " + model.getFileName(), System.err);
        if (bar != null) b.onProgress(bar::update);
        try {
            return Dbrx.load(model, b.build());
        } finally {
            if (bar != null) bar.done();
        }
    }
}
