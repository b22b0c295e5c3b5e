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

    @Option(names = "--ep", defaultValue = "1", description = "expert-parallel ranks")
    int expertParallel;

    @Option(names = "--devices", split = ",", description = "this process's GPUs, one rank each (e.g. 0,1)")
    java.util.List<Integer> devices;

    @Option(names = "--rendezvous", description = "several processes: process 0's host:port (default MASTER_ADDR/MASTER_PORT)")
    String rendezvous;

    @Option(names = "--nodes", description = "processes, one per host (default: the launcher's WORLD_SIZE, SLURM_NTASKS, ...)")
    Integer nodes;

    @Option(names = "--node-rank", description = "this process's index (default: the launcher's RANK, SLURM_PROCID, ...)")
    Integer nodeRank;

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
            .expertParallel(expertParallel)
            .rendezvous(rendezvous)
            .nodes(nodes)
            .nodeRank(nodeRank)
            .threads(threads)
            .kvCacheBytes(kvCacheBytes);
        if (maxBatchTokens != null) b.maxBatchTokens(maxBatchTokens);
        if (devices != null) b.devices(devices);
        ProgressBar bar = quiet ? null : new ProgressBar("loading " + model.getFileName(), System.err);
        if (bar != null) b.onProgress(bar::update);
        try {
            return Dbrx.load(model, b.build());
        } finally {
            if (bar != null) bar.done();
        }
    }
}
