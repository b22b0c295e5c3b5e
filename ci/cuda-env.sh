# Source this (". ci/cuda-env.sh") to build the CUDA backend with the CUDA 13.0 toolkit wheels that
# ci/deps.sh puts in .venv (no system toolkit needed, e.g. on CI). The wheels ship only versioned
# libraries (libcudart.so.13), so the unversioned names the linker and FindCUDAToolkit look for are
# added as symbolic links inside .venv. Where /usr/local/cuda exists (the GPU machine) it is used instead.
_dbrx_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDAToolkit_ROOT=/usr/local/cuda
else
  _dbrx_cu=$(ls -d "$_dbrx_root"/.venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n1)
  if [ -z "$_dbrx_cu" ]; then
    echo "ci/cuda-env.sh: no CUDA toolkit in .venv (run ci/deps.sh)" >&2
  else
    for _l in cudart cublas cublasLt; do
      [ -e "$_dbrx_cu/lib/lib$_l.so" ] || ln -sf "lib$_l.so.13" "$_dbrx_cu/lib/lib$_l.so"
    done
    # nvcc.profile adds -L<toolkit>/lib64; the wheels use lib.
    [ -e "$_dbrx_cu/lib64" ] || ln -s lib "$_dbrx_cu/lib64"
    export CUDAToolkit_ROOT="$_dbrx_cu"
  fi
fi
if [ -n "${CUDAToolkit_ROOT:-}" ]; then
  export CUDACXX="$CUDAToolkit_ROOT/bin/nvcc"
  export PATH="$CUDAToolkit_ROOT/bin:$PATH"
fi
unset _dbrx_root _dbrx_cu _l
