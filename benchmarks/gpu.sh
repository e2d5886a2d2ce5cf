#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build the CUDA extension with this machine's torch and
# nvcc, run the GPU tests, run the GPU benchmarks, and leave logs, JSON and tables in OUTDIR.
#   bash benchmarks/gpu.sh OUTDIR
# Wheels that the machine lacks (liger-kernel, hypothesis, ...) may be put in ./wheels; they are
# installed from there without a network.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
status=0
{
    nvidia-smi
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/machine.txt" 2>&1
if compgen -G "wheels/*.whl" > /dev/null; then
    pip install --no-index --no-deps wheels/*.whl > "$out/wheels.log" 2>&1 || status=1
fi
pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { echo "build failed"; exit 1; }
python -m pytest tests -m cuda -q -p no:cacheprovider > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
python -m pytest benchmarks/test_gpu.py --benchmark-enable -q -p no:cacheprovider \
    --benchmark-json="$out/gpu.json" > "$out/benchmarks.log" 2>&1 || status=1
tail -3 "$out/benchmarks.log"
python -m benchmarks.gpu_report "$out/gpu.json" > "$out/gpu.md" 2> "$out/report.log" || status=1
exit $status
