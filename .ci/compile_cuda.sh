#!/usr/bin/env bash
# Compiles every csrc/*.cu with `nvcc -c` for sm_80 and sm_90, warnings as errors. Needs the CUDA
# toolkit, not a GPU (the .cu files include no torch headers). Exits non-zero on any error.
# NVCC=/path/to/nvcc overrides the lookup (PATH, then /usr/local/cuda/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    echo "compile_cuda.sh: nvcc not found on PATH nor at /usr/local/cuda/bin/nvcc;" \
      "install the CUDA toolkit or set NVCC" >&2
    exit 2
  fi
fi

shopt -s nullglob
sources=(csrc/*.cu)
if ((${#sources[@]} == 0)); then
  echo "compile_cuda.sh: no csrc/*.cu files" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$nvcc" --version | tail -n 1
failed=0
for src in "${sources[@]}"; do
  echo "nvcc -c $src (sm_80, sm_90)"
  if ! "$nvcc" -c -std=c++17 -O3 -Werror all-warnings --threads 2 \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$src" -o "$out/$(basename "$src" .cu).o"; then
    echo "compile_cuda.sh: $src failed" >&2
    failed=1
  fi
done
exit "$failed"
