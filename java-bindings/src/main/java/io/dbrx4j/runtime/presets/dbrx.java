package io.dbrx4j.runtime.presets;

import org.bytedeco.javacpp.annotation.Platform;
import org.bytedeco.javacpp.annotation.Properties;
import org.bytedeco.javacpp.tools.Info;
import org.bytedeco.javacpp.tools.InfoMap;
import org.bytedeco.javacpp.tools.InfoMapper;

/**
 * JavaCPP preset over {@code dbrx/dbrx.h}, the runtime's C API.
 *
 * <p>The parser turns the header into {@code io.dbrx4j.runtime.*} (one class per struct and callback) and
 * {@code io.dbrx4j.runtime.global.dbrx} (the functions and constants). The "-cuda" extension makes the
 * Loader try {@code linux-x86_64-cuda/} (the CUDA build, present when the {@code linux-x86_64-cuda}
 * classifier jar is on the class path) before {@code linux-x86_64/}: when the CUDA build cannot be
 * loaded, for instance because the machine has no CUDA runtime, the CPU build is used instead.
 */
@Properties(
    value = {
        @Platform(value = "linux-x86_64", include = "dbrx/dbrx.h", link = "dbrx@.0"),
        // The same library built with the CUDA backend; at load time, tried before the one above.
        @Platform(value = "linux-x86_64", extension = "-cuda")},
    target = "io.dbrx4j.runtime",
    global = "io.dbrx4j.runtime.global.dbrx")
public class dbrx implements InfoMapper {
    @Override
    public void map(InfoMap infoMap) {
        // Visibility and header-guard macros carry no meaning for Java.
        infoMap.put(new Info("DBRX_API").cppTypes().annotations())
               .put(new Info("DBRX_H").define(false));
    }
}
