#!/usr/bin/env bash
# Assembles build-jvm-gpu/ (a jlink'd JRE, javacpp, the runtime jar and its linux-x86_64-cuda classifier,
# GpuSmoke) after `mvn install`, for a GPU machine that has no JDK:
#   java-bindings/gpu-smoke.sh            (here: assemble)
#   build-jvm-gpu/run.sh                  (there: run; carry build-jvm-gpu)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build-jvm-gpu
m2=${HOME}/.m2/repository
v=0.1.0-SNAPSHOT
rm -rf "$out" && mkdir -p "$out/lib" "$out/classes"
jlink --add-modules java.base,jdk.unsupported,java.logging --strip-debug --no-header-files --no-man-pages \
  --compress=2 --output "$out/jre"
cp "$m2/org/bytedeco/javacpp/1.5.14/javacpp-1.5.14.jar" "$out/lib/"
cp "$m2/io/dbrx4j/dbrx4j-runtime/$v/dbrx4j-runtime-$v.jar" "$out/lib/"
cp "$m2/io/dbrx4j/dbrx4j-runtime/$v/dbrx4j-runtime-$v-linux-x86_64-cuda.jar" "$out/lib/"
javac -d "$out/classes" -cp "$out/lib/*" "$root/java-bindings/src/gpu-smoke/GpuSmoke.java"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/jre/bin/java" -Dorg.bytedeco.javacpp.cachedir="$here/cache" -cp "$here/classes:$here/lib/*" GpuSmoke "$@"
RUN
chmod +x "$out/run.sh"
du -sh "$out"
