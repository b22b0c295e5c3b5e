#!/usr/bin/env bash
# Every test that needs no GPU, as CI runs it (.ci/run) and as the README tells a new user:
#   1. installs what is missing (ci/deps.sh: Debian packages, cmake, the CUDA 13.0 toolkit wheels)
#   2. builds the native runtime with the CUDA backend compiled (so kernels never rot) and runs ctest
#   3. fuzzes the safetensors and config parsers for a bounded time (FUZZ_SECONDS, default 60 each)
#   4. builds the JVM artifacts and runs their tests (ci/jvm-test.sh)
# SKIP_JVM=1 or SKIP_FUZZ=1 leave a part out when iterating locally.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
t0=$(date +%s)
step() { echo "== $(($(date +%s) - t0))s: $*"; }

step "dependencies"
bash ci/deps.sh
. ci/cuda-env.sh

step "native build (build/)"
.venv/bin/cmake -S . -B build -G Ninja -DDBRX_CUDA=AUTO >/dev/null
.venv/bin/cmake --build build -j"$(nproc)"

step "native tests"
ctest --test-dir build --output-on-failure -j2 --timeout 900

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  step "fuzzing"
  FUZZ_SECONDS=${FUZZ_SECONDS:-60} bash ci/fuzz.sh
fi

if [ "${SKIP_JVM:-0}" != 1 ] && [ -f ci/jvm-test.sh ]; then
  step "JVM build and tests"
  # The CUDA classifier jar reuses build/ when it has the CUDA backend, instead of compiling it again.
  if grep -q '^CMAKE_CUDA_COMPILER:[^=]*=.\+' build/CMakeCache.txt 2>/dev/null; then
    export DBRX_NATIVE_CUDA_DIR="$root/build"
  fi
  bash ci/jvm-test.sh
fi
step "all tests passed"
