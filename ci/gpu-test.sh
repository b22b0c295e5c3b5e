#!/usr/bin/env bash
# The GPU run, on a machine with an NVIDIA GPU (CI has none): builds the CUDA backend, runs the
# CUDA tests (kernels vs the CPU reference kernels, conformance on both fixtures), the synthetic
# full-width benchmarks and, in the same run, the PyTorch peers, and ends with one table
# ours / floor / peer.
#   ci/gpu-test.sh [--stages build,tests,bench,peers[,profile]] [--layers N[,M...]] [--quick] [--budget SECONDS]
#                  [--filter GTEST_FILTER] [--only moe,attention,e2e]   (subsets, for kernel work)
#                  [--tp N]   (stage "tp": the sharded bench over N GPUs through NCCL, per-rank memory and
#                              collective time, at the first --layers value; tp.log)
# --layers 8,2: every figure with 8 synthetic layers, then the end-to-end figures again with 2 layers,
# the depth at which the Hugging Face peer runs (the last value). Logs and results go to $OUT (default ./gpu-out): summary.txt, cuda-tests.log, bench.log, bench.json,
# peers.log, peers.json, profile.log, table.md (build.log when the build fails). Each stage gets what is left of --budget (default 570 s), so a
# slow stage cannot eat the whole run. Needs .deps (ci/deps.sh --vendor) where the machine lacks
# nlohmann-json and GoogleTest.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stages="build,tests,bench,peers"
layers=2
quick=""
budget=570
filter="*"
only="moe,attention,e2e"
tp=2
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) stages="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --quick) quick="--quick"; shift ;;
    --budget) budget="$2"; shift 2 ;;
    --filter) filter="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --tp) tp="$2"; shift 2 ;;
    *) echo "gpu-test.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
deadline=$(( $(date +%s) + budget ))
left() { echo $(( deadline - $(date +%s) )); }
has() { case ",$stages," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
status=0
step() {  # step NAME LOG COMMAND...: runs under the remaining budget, tees the log
  local name="$1" log="$2"; shift 2
  local t=$(left)
  if [ "$t" -le 10 ]; then echo "== $name: skipped, budget spent" | tee -a "$out/summary.txt"; status=1; return 1; fi
  echo "== $name (up to ${t}s)"
  local t0=$(date +%s)
  timeout --kill-after=5 "$t" "$@" > >(tee "$out/$log") 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.txt"
  [ $rc -ne 0 ] && status=1
  return $rc
}

. ci/cuda-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/summary.txt"
jobs=$(nproc)
build=build-gpu
if has build; then
  cmake -S . -B $build -G Ninja -DDBRX_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a >"$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 1; }
  step build build.log cmake --build $build -j"$jobs" --target dbrx_cuda_tests dbrx_tests dbrx_cli || exit 1
  rm -f "$out/build.log"  # only 8 files come back from the machine; keep the build log on failure only
fi
if has tests; then
  # The GPU suite, then the wgmma prefill kernel's own tests in a process of their own (a sticky CUDA error
  # there must not take the other suites with it), then the CPU binary's NCCL tests (CI has no GPU).
  step tests cuda-tests.log bash -c "$build/bin/dbrx_cuda_tests --gtest_color=no --gtest_filter='$filter:-CudaFlashWgmma.*'; a=\$?;
    [ '$filter' = '*' ] && { timeout 120 $build/bin/dbrx_cuda_tests --gtest_color=no --gtest_filter='CudaFlashWgmma.*' || a=1; };
    $build/bin/dbrx_tests --gtest_color=no --gtest_filter='DistNccl.*'; b=\$?; exit \$(( a | b ))"
fi
if has bench; then
  first=${layers%%,*}
  step bench bench.log $build/bin/dbrx bench --synthetic dbrx --layers "$first" $quick --only "$only" --json "$out/bench.json"
  for n in $(echo "${layers#$first}" | tr ',' ' '); do
    case ",$only," in *,e2e,*) ;; *) continue ;; esac
    step "bench e2e $n layers" bench-$n.log $build/bin/dbrx bench --synthetic dbrx --layers "$n" $quick --only e2e \
      --json "$out/bench-$n.json" && python3 - "$out/bench.json" "$out/bench-$n.json" <<'PY'
import json, sys
main, extra = (json.load(open(p)) for p in sys.argv[1:3])
main["rows"] += extra["rows"]
main["layers"] = f"{main['layers']} (and {extra['layers']} for the end-to-end rows that say so)"
json.dump(main, open(sys.argv[1], "w"), indent=2)
PY
    rm -f "$out/bench-$n.json" "$out/bench-$n.log"  # merged into bench.json; 8 files come back at most
  done
fi
if has tp; then
  gpus=$(nvidia-smi -L | wc -l)
  devs=$(seq -s, 0 $(( tp - 1 )))
  if [ "$gpus" -ge "$tp" ]; then
    step "bench tp=$tp" tp.log $build/bin/dbrx bench --synthetic dbrx --layers "${layers%%,*}" --tp "$tp" --devices "$devs" $quick
  else
    echo "== bench tp=$tp: skipped, $gpus GPU(s) visible" | tee -a "$out/summary.txt"
  fi
fi
if has profile; then
  # Per-kernel time and memory throughput of one decode-sized MoE layer and attention (Nsight Compute;
  # clocks left as they are).
  step profile profile.log bash -c "
    ncu --clock-control none --section SpeedOfLight -k 'regex:moe_|gemv_|route|permute|gather' --launch-count 8 \
      $build/bin/dbrx bench --synthetic dbrx --layers 1 --quick | grep -E '^  [a-z_ ]+|Duration|DRAM Through'
    ncu --clock-control none --section SpeedOfLight -k 'regex:attention_keys|attention_merge|flash_prefill' --launch-count 4 \
      $build/bin/dbrx bench --synthetic dbrx --layers 1 --quick | grep -E '^  [a-z_ ]+|Duration|DRAM Through|Compute'"
fi
if has peers; then
  export PYTHONUNBUFFERED=1
  step peers peers.log python3 ci/peers/peers.py --json "$out/peers.json" --layers "${layers##*,}" $quick
fi
if [ -f "$out/bench.json" ]; then
  python3 ci/peers/table.py "$out/bench.json" "$out/peers.json" 2>/dev/null >"$out/table.md" \
    || python3 ci/peers/table.py "$out/bench.json" >"$out/table.md"
  cat "$out/table.md"
fi
cat "$out/summary.txt"
exit $status
