package io.dbrx4j.runtime;

import static io.dbrx4j.runtime.global.dbrx.*;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Paths;
import org.junit.jupiter.api.Test;

/** The generated bindings against the JNI library built in this module. */
class RuntimeBindingsTest {
    @Test
    void loadsAndReportsItsVersion() {
        assertFalse(dbrx_version().getString().isEmpty());
        assertEquals("BAD_CHECKPOINT", dbrx_status_name(DBRX_ERR_BAD_CHECKPOINT).getString());
    }

    @Test
    void defaultsComeFromTheNativeLibrary() {
        dbrx_sampling_params s = dbrx_sampling_default_params();
        assertEquals(256, s.max_tokens());
        assertEquals(-1, s.n_stop_ids());
        assertEquals(1f, s.top_p());
        dbrx_engine_params e = dbrx_engine_default_params();
        assertEquals(16, e.block_size());
        assertTrue(e.enable_prefix_cache());
        s.close();
        e.close();
    }

    @Test
    void aFailedLoadIsAStatusWithAMessage() {
        dbrx_model model = new dbrx_model();
        int status = dbrx_model_load("/nonexistent/checkpoint", dbrx_model_default_params(), model);
        assertNotEquals(DBRX_OK, status);
        assertTrue(model.isNull());
        assertFalse(dbrx_last_error().getString().isEmpty());
    }

    @Test
    void greedyGenerationThroughTheConvenienceCall() {
        String dir = Paths.get(System.getProperty("dbrx.model.dir")).toString();
        dbrx_model_params mp = dbrx_model_default_params().n_threads(2);
        dbrx_model model = new dbrx_model();
        assertEquals(DBRX_OK, dbrx_model_load(dir, mp, model), () -> dbrx_last_error().getString());
        dbrx_engine engine = new dbrx_engine();
        assertEquals(DBRX_OK, dbrx_engine_create(model, dbrx_engine_default_params().kv_blocks(64), engine));
        dbrx_sampling_params sp = dbrx_sampling_default_params().max_tokens(4).n_stop_ids(0);
        int[] out = new int[4];
        int[] n = new int[1];
        int[] finish = new int[1];
        int status = dbrx_generate(engine, new int[] {34583}, 1, sp, out, 4, n, (float[]) null, finish);
        assertEquals(DBRX_OK, status, () -> dbrx_last_error().getString());
        assertEquals(4, n[0]);
        assertEquals(DBRX_FINISH_LENGTH, finish[0]);
        // reference.json case 0 begins 36192, 40025, 63682 (margins above tolerance)
        assertEquals(36192, out[0]);
        assertEquals(40025, out[1]);
        assertEquals(63682, out[2]);
        dbrx_engine_free(engine);
        dbrx_model_free(model);
    }
}
