#!/usr/bin/env bash
# Builds libdbrx for a JavaCPP classifier; run by Maven (java-bindings/pom.xml) at `initialize`.
#   build-native.sh cpu  BUILD_DIR    CPU backend only
#   build-native.sh cuda BUILD_DIR    CUDA backend (plus the CPU one), with the toolkit of ci/cuda-env.sh
# Incremental: a second run only rebuilds what changed. -j2 keeps the shared 2-core machine usable.
set -euo pipefail
kind=$1
build=$2
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cmake=cmake
[ -x .venv/bin/cmake ] && cmake=.venv/bin/cmake
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
case "$kind" in
  cpu) cuda=OFF ;;
  cuda)
    # shellcheck source=/dev/null
    . ci/cuda-env.sh
    if [ -z "${CUDACXX:-}" ] || [ ! -x "$CUDACXX" ]; then
      echo "build-native.sh: no CUDA compiler (run ci/deps.sh, or build with -Ddbrx.cuda.skip=true)" >&2
      exit 1
    fi
    cuda=ON ;;
  *) echo "usage: build-native.sh cpu|cuda BUILD_DIR" >&2; exit 2 ;;
esac
if [ ! -f "$build/CMakeCache.txt" ]; then
  "$cmake" -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DDBRX_CUDA=$cuda -DDBRX_TESTS=OFF >/dev/null
fi
"$cmake" --build "$build" -j2 --target dbrx
echo "build-native.sh: $kind libdbrx in $build/lib"
