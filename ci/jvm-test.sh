#!/usr/bin/env bash
# The JVM test suite, end to end:
#   1. `mvn install` from the root: libdbrx (CMake), the JavaCPP bindings and their classifier jars
#      (linux-x86_64; linux-x86_64-cuda where ci/deps.sh installed the CUDA toolkit), the SDK and the
#      CLI, each module with its JUnit 5 tests, all into the local repository (~/.m2);
#   2. the JNI path against the C++ one: `dbrx eval` and the CLI's `eval` give the same greedy ids and
#      the same last prompt logits (within 1e-5);
#   3. samples/consumer, a project that depends on the installed artifacts by coordinates only.
# Knobs: DBRX_CUDA_SKIP=1 leaves the CUDA classifier out; MVN_OFFLINE=1 adds -o (a warm ~/.m2);
# DBRX_NATIVE_CUDA_DIR=DIR reuses a CUDA build of libdbrx already configured there (ci/test.sh's build/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mvn_flags=(-B)
[ "${MVN_OFFLINE:-0}" = 1 ] && mvn_flags+=(-o)
[ "${DBRX_CUDA_SKIP:-0}" = 1 ] && mvn_flags+=(-Ddbrx.cuda.skip=true)
[ -n "${DBRX_NATIVE_CUDA_DIR:-}" ] && mvn_flags+=("-Ddbrx.native.cuda.dir=$DBRX_NATIVE_CUDA_DIR")

echo "== jvm-test: mvn install (native build, bindings, SDK, CLI, JUnit)"
mvn "${mvn_flags[@]}" install

echo "== jvm-test: JNI greedy ids and last logits against the C++ dbrx eval"
cmake=cmake
[ -x .venv/bin/cmake ] && cmake=.venv/bin/cmake
"$cmake" --build build-mvn-cpu -j2 --target dbrx_cli >/dev/null
model=models/tiny-dbrx-cl100k
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
build-mvn-cpu/bin/dbrx eval --model "$model" --cases "$model/reference.json" --out "$tmp/cpp.json" --threads 2
java -jar samples/cli/target/dbrx4j-cli-0.1.0-SNAPSHOT-all.jar eval --model "$model" \
  --cases "$model/reference.json" --out "$tmp/jvm.json" --threads 2 --quiet
python3 - "$tmp/cpp.json" "$tmp/jvm.json" <<'PY'
import json, sys
cpp = json.load(open(sys.argv[1]))["cases"]
jvm = json.load(open(sys.argv[2]))["cases"]
assert len(cpp) == len(jvm), f"dbrx eval has {len(cpp)} cases, JNI {len(jvm)}"
ids_cpp = [c["greedy_ids"] for c in cpp]
ids_jvm = [c["greedy_ids"] for c in jvm]
assert ids_cpp == ids_jvm, f"dbrx eval {ids_cpp} != JNI {ids_jvm}"
worst = 0.0
for i, (a, b) in enumerate(zip(cpp, jvm)):
    la, lb = a["last_logits"], b["last_logits"]
    assert len(la) > 0 and len(la) == len(lb), f"case {i}: {len(la)} last logits from dbrx eval, {len(lb)} from JNI"
    d = max(abs(x - y) for x, y in zip(la, lb))
    assert d <= 1e-5, f"case {i}: max |dbrx eval - JNI| last logit = {d:.3g} > 1e-5"
    worst = max(worst, d)
print(f"jvm-test: {len(cpp)} cases, JNI greedy ids == dbrx eval greedy ids, last logits within {worst:.3g}")
PY

echo "== jvm-test: samples/consumer by coordinates"
mvn "${mvn_flags[@]}" -q -f samples/consumer/pom.xml package exec:java -Dexec.args="$root/$model"
if [ "${DBRX_CUDA_SKIP:-0}" != 1 ] && [ -f .venv/.cuda-13.0 ]; then
  # The CUDA classifier on a machine without a usable CUDA runtime falls back to the CPU build.
  mvn "${mvn_flags[@]}" -q -f samples/consumer/pom.xml -Pcuda package exec:java -Dexec.args="$root/$model"
fi
echo "jvm-test: all passed"
