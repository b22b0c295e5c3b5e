#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian machine (CI, a new user).
#   ci/deps.sh            Debian packages, a current cmake, the CUDA 13.0 toolkit wheels
#   ci/deps.sh --vendor   only fill .deps/ with the header/source packages the GPU machine lacks
# Idempotent and cached: a second run does nothing that is already done.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

vendor() {
  # nlohmann-json and GoogleTest sources from Debian, unpacked into .deps/ (no root needed),
  # so the GPU machine (which has neither) can build the tests: carry .deps there.
  [ -f .deps/usr/include/nlohmann/json.hpp ] && [ -d .deps/usr/src/googletest ] && return 0
  mkdir -p .deps/debs
  (cd .deps/debs && apt-get download nlohmann-json3-dev googletest >/dev/null)
  for f in .deps/debs/*.deb; do dpkg -x "$f" .deps; done
}

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [ "${1:-}" = "--vendor" ]; then vendor; exit 0; fi

apt_install g++ ninja-build libgtest-dev nlohmann-json3-dev clang-14 libclang-rt-14-dev python3-venv maven openjdk-17-jdk-headless
vendor

# A Python venv holds a current cmake (Debian's 3.25 predates CUDA 13), the CUDA 13.0 toolkit
# wheels (nvcc, runtime, cccl headers, cuBLAS, NCCL) and numpy for the reference script. nvvm and crt
# are pinned to nvcc's release: a newer nvvm emits PTX that nvcc 13.0's ptxas rejects.
if [ ! -x .venv/bin/cmake ] || [ ! -f .venv/.cuda-13.0.88 ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "cmake>=3.28,<5" numpy \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-cublas==13.0.2.14" "nvidia-nccl-cu13==2.28.9"
  touch .venv/.cuda-13.0.88
fi
# The stable "toolkit installed" marker the Maven build and ci/jvm-test.sh look for.
touch .venv/.cuda-13.0
# Unversioned library links for the linker and CMake (see ci/cuda-env.sh).
. ci/cuda-env.sh
