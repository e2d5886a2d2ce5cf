#!/usr/bin/env bash
# Compiles the CUDA code without a GPU; warnings are errors, and any error exits non-zero.
#  - Every csrc/*.cu with `nvcc -c` for sm_80 and sm_90 and setup.py's nvcc flags. The .cu files
#    include no torch headers, so only the CUDA toolkit is needed.
#  - Every CUDA binding, csrc/*_cuda.cpp, with `-fsyntax-only -Wall` against torch's CUDA headers,
#    with the include paths (in the same order) and flags that setup.py's CUDAExtension gives it;
#    the paths are -isystem, so that warnings count in csrc only. A CPU wheel of torch lacks the
#    generated c10/cuda/impl/cuda_cmake_macros.h: .ci/cuda_stub stands in for it, after torch's own
#    include paths, so that a CUDA build of torch uses its own.
# The compiles run in parallel, JOBS at a time (default: the number of CPUs).
# Overrides: NVCC (else PATH, then /usr/local/cuda/bin), CXX (else c++), PYTHON (else python),
# CUDA_HOME (else found from nvcc).
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
cxx="${CXX:-c++}"
python="${PYTHON:-python}"
max_jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

shopt -s nullglob
cu_sources=(csrc/*.cu)
cpp_sources=(csrc/*_cuda.cpp)
if ((${#cu_sources[@]} == 0)); then
  echo "compile_cuda.sh: no csrc/*.cu files" >&2
  exit 1
fi

# setup.py names object files by the sources' stems: x.cpp and x.cu would both make x.o.
clashes="$(printf '%s\n' csrc/*.cpp csrc/*.cu | sed 's/\.[^.]*$//' | sort | uniq -d)"
if [[ -n "$clashes" ]]; then
  echo "compile_cuda.sh: a .cpp and a .cu share a stem (one object file for both):" $clashes >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$nvcc" --version | tail -n 1

# The toolkit's include directory (nvcc may be a wrapper script: ask it where it lives).
cuda_home="${CUDA_HOME:-}"
if [[ -z "$cuda_home" ]]; then
  cuda_home="$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
fi
if [[ ! -f "$cuda_home/include/cuda_runtime_api.h" ]]; then
  echo "compile_cuda.sh: no cuda_runtime_api.h under '$cuda_home/include'; set CUDA_HOME" >&2
  exit 2
fi

# setup.py's flags (it runs setup() only as __main__) and the include paths CUDAExtension uses:
# torch's include_paths for CUDA (for a CPU build of torch, which knows no CUDA_HOME, torch's own),
# then Python's, as setuptools adds it; then the toolkit's, and the stub last.
if ! "$python" - >"$out/flags" <<'EOF'; then
import inspect
import runpy
import sysconfig

from torch.utils import cpp_extension

setup_py = runpy.run_path("setup.py", run_name="fastdml_setup")
for flag in setup_py["cxx_flags"]():
    print("cxx", flag)
for flag in setup_py["nvcc_flags"]():
    print("nvcc", flag)
try:
    if "device_type" in inspect.signature(cpp_extension.include_paths).parameters:
        paths = cpp_extension.include_paths(device_type="cuda")
    else:
        paths = cpp_extension.include_paths(cuda=True)
except OSError:  # a CPU build of torch: CUDA_HOME is unknown to it
    paths = cpp_extension.include_paths()
for path in [*paths, sysconfig.get_paths()["include"]]:
    print("include", path)
EOF
  echo "compile_cuda.sh: could not read the flags from setup.py and torch ($python)" >&2
  exit 1
fi
cxx_flags=()
nvcc_flags=()
includes=()
while read -r kind value; do
  case "$kind" in
    cxx) cxx_flags+=("$value") ;;
    nvcc) nvcc_flags+=("$value") ;;
    include) includes+=(-isystem "$value") ;;
  esac
done <"$out/flags"
includes+=(-isystem "$cuda_home/include" -isystem .ci/cuda_stub)

# One compile in the background: its output goes to $out/NAME.log, its status to $out/NAME.rc.
run_job() {
  local name="$1"
  shift
  local start=$SECONDS rc=0
  "$@" >"$out/$name.log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - start))" >"$out/$name.rc"
}

names=()
start_job() {
  while (($(jobs -rp | wc -l) >= max_jobs)); do wait -n || true; done
  names+=("$1")
  run_job "$@" &
}

start=$SECONDS
for src in "${cu_sources[@]}"; do
  start_job "$(basename "$src")" "$nvcc" -c "${nvcc_flags[@]}" -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$src" -o "$out/$(basename "$src" .cu).o"
done
for src in "${cpp_sources[@]}"; do
  start_job "$(basename "$src")" "$cxx" -fsyntax-only -Wall -Werror "${cxx_flags[@]}" -fPIC \
    "${includes[@]}" -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "$src"
done
wait

failed=0
for name in "${names[@]}"; do
  read -r rc seconds <"$out/$name.rc"
  if [[ "$rc" == 0 ]]; then
    echo "ok     $name (${seconds}s)"
  else
    echo "FAILED $name (${seconds}s):"
    cat "$out/$name.log"
    failed=1
  fi
done
echo "compile_cuda.sh: $((SECONDS - start))s, $max_jobs jobs at a time"
if ((failed)); then
  echo "compile_cuda.sh: compile errors above" >&2
fi
exit "$failed"
