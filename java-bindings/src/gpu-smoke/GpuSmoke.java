import static io.dbrx4j.runtime.global.dbrx.*;

import io.dbrx4j.runtime.dbrx_engine;
import io.dbrx4j.runtime.dbrx_model;
import io.dbrx4j.runtime.dbrx_model_info;
import io.dbrx4j.runtime.dbrx_model_params;
import io.dbrx4j.runtime.dbrx_sampling_params;
import java.util.Arrays;
import org.bytedeco.javacpp.Loader;

/**
 * Smoke test of the linux-x86_64-cuda classifier on a GPU machine (run by gpu-smoke.sh): the Loader
 * picks the CUDA build, the runtime sees the GPU, and the same greedy request runs on the CPU and on
 * the GPU backend of that build. Exit 0 when the CUDA build loaded and generated.
 */
public final class GpuSmoke {
    public static void main(String[] args) {
        String dir = args[0];
        String lib = Loader.load(io.dbrx4j.runtime.global.dbrx.class);
        System.out.println("loaded " + lib + " version " + dbrx_version().getString());
        boolean cuda = dbrx_cuda_available();
        System.out.println("dbrx_cuda_available = " + cuda);
        int[] prompt = {79025, 39351, 52354, 53639, 47185, 33264, 15168, 15042};
        int[] cpu = generate(dir, DBRX_DEVICE_CPU, prompt);
        System.out.println("cpu  greedy " + Arrays.toString(cpu));
        if (!cuda) System.exit(lib.contains("-cuda") ? 3 : 2);
        int[] gpu = generate(dir, DBRX_DEVICE_CUDA, prompt);
        System.out.println("cuda greedy " + Arrays.toString(gpu));
        int agree = 0;
        while (agree < gpu.length && gpu[agree] == cpu[agree]) agree++;
        System.out.println("cuda agrees with cpu on the first " + agree + " of " + gpu.length + " ids");
    }

    private static int[] generate(String dir, int device, int[] prompt) {
        dbrx_model_params mp = dbrx_model_default_params().device(device).n_threads(4);
        dbrx_model model = new dbrx_model();
        check(dbrx_model_load(dir, mp, model), "load");
        dbrx_model_info info = new dbrx_model_info();
        check(dbrx_model_get_info(model, info), "info");
        System.out.println("model on device " + info.device() + ", " + info.weight_bytes() + " weight bytes");
        dbrx_engine engine = new dbrx_engine();
        check(dbrx_engine_create(model, dbrx_engine_default_params().kv_blocks(64), engine), "engine");
        dbrx_sampling_params sp = dbrx_sampling_default_params().max_tokens(12).n_stop_ids(0);
        int[] out = new int[12];
        int[] n = new int[1];
        int[] finish = new int[1];
        check(dbrx_generate(engine, prompt, prompt.length, sp, out, out.length, n, (float[]) null, finish), "generate");
        dbrx_engine_free(engine);
        dbrx_model_free(model);
        return Arrays.copyOf(out, n[0]);
    }

    private static void check(int status, String what) {
        if (status != DBRX_OK) {
            System.out.println(what + " failed: " + dbrx_status_name(status).getString() + ": " + dbrx_last_error().getString());
            System.exit(1);
        }
    }
}
