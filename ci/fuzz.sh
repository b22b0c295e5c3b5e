#!/usr/bin/env bash
# Builds the libFuzzer targets (clang-14, ASan + UBSan) in their own build dir and runs each for a
# bounded time. Exits non-zero when a target crashes, leaks, times out or breaks an invariant; the
# reproducer is kept under <build>/fuzz-artifacts/.
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_BUILD    build directory (default build-fuzz)
#   FUZZ_JOBS     parallel compile jobs (default 2)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

seconds=${FUZZ_SECONDS:-60}
build=${FUZZ_BUILD:-build-fuzz}
jobs=${FUZZ_JOBS:-2}
cmake=cmake
[ -x .venv/bin/cmake ] && cmake=.venv/bin/cmake
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

CC=clang-14 CXX=clang++-14 "$cmake" -S . -B "$build" "${generator[@]}" \
  -DDBRX_FUZZ=ON -DDBRX_TESTS=OFF -DDBRX_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
"$cmake" --build "$build" -j"$jobs" --target fuzz_safetensors fuzz_model_config

mkdir -p "$build/fuzz-artifacts"
status=0
for target in safetensors model_config; do
  # New inputs go to a scratch corpus in the build dir; the committed seeds stay read-only.
  work="$build/fuzz-corpus/$target"
  mkdir -p "$work"
  echo "== fuzz_$target for ${seconds}s"
  if ! "$build/bin/fuzz_$target" "$work" "cpp/fuzz/corpus/$target" \
      -dict="cpp/fuzz/$target.dict" -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$build/fuzz-artifacts/$target-" -print_final_stats=1 2>"$build/fuzz-$target.log"; then
    echo "fuzz_$target FAILED; last lines of $build/fuzz-$target.log:"
    tail -n 40 "$build/fuzz-$target.log"
    status=1
  else
    grep -E "^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb" "$build/fuzz-$target.log" || true
  fi
done
exit $status
