#!/usr/bin/env bash
# Everything that needs a GPU, in stages (docs/gpu.md). Each stage writes
# into OUTDIR as it goes and has its own time limit, so a timeout still returns what ran:
#   a. build the CUDA extension for this GPU's architecture only, translation units in parallel;
#   b. the correctness smoke (benchmarks/gpu_smoke.py), one process per backend;
#   t. the Triton tile choices measured (benchmarks/gpu_tune.py); the best is used from here on;
#   c. the benchmarks that decide the GPU targets and backend="auto" (FASTDML_GPU_SHAPES=core);
#   d. the cuda-marked tests (TESTS_LIMIT seconds, default 60);
#   s. the paper's small shapes (benchmarks/gpu_small_shapes.py), only if STAGES asks for it;
#   e. the remaining benchmark shapes and candidates, only if STAGES asks for them;
#   l. the stacked cohort of K = 8 ResNet-32 peers against the unstacked one
#      (benchmarks/trainer_overhead.py) and the fused linear mutual loss (benchmarks/gpu_linear.py,
#      the KL and the generalized JSD(0.5) against Liger-Kernel's), only if asked;
#   f. the loss family on logits (benchmarks/gpu_family.py): the KL, reverse KL and JSD(0.5) of
#      both GPU ops against torch.compile and Liger-Kernel's JSD; only if asked;
#   n. Nsight Compute's counters of one CUDA-op forward at (4, 8192, 32000), float32 and
#      bfloat16 (benchmarks/gpu_ncu.py): DRAM bytes per logit byte, instructions, occupancy; only
#      if asked.
#   bash benchmarks/gpu.sh OUTDIR            # stages a b t c d: at most 10 minutes, 8 files
#   STAGES="a e" bash benchmarks/gpu.sh OUTDIR
#   STAGES="a l" bash benchmarks/gpu.sh OUTDIR   # at most 9 minutes, 6 files
#   STAGES="a f" bash benchmarks/gpu.sh OUTDIR
# SMOKE_BACKENDS (default "triton cuda") picks the backends stage b checks.
# Wheels the machine lacks (liger-kernel) may be put in ./wheels; they install without a network.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUTDIR}"
stages="${STAGES:-a b t c d}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
summary=()

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, notes how it ended
  local name="$1" limit="$2" start=$SECONDS rc
  shift 2
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  summary+=("$(printf '%-28s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  ((rc == 0)) || status=1
  return "$rc"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'sms', torch.cuda.get_device_properties(0).multi_processor_count)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
if compgen -G "wheels/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/fastdml-wheels wheels/*.whl \
    >> "$out/machine.txt" 2>&1 && export PYTHONPATH="/tmp/fastdml-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ " $stages " == *" a "* ]]; then
  arch="$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" stage "a build (sm_${arch/./})" 120 \
    python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; printf '%s\n' "${summary[@]}"; exit 1; }
fi
log="$out/stages.log"
if [[ " $stages " == *" b "* ]]; then
  # Triton compiles about 130 specializations on first use here, the CUDA op none.
  for backend in ${SMOKE_BACKENDS:-triton cuda}; do
    limit="$([[ $backend == triton ]] && echo 120 || echo 60)"
    stage "b smoke ($backend)" "$limit" python -X faulthandler -m benchmarks.gpu_smoke \
      "$out/smoke.jsonl" "$backend" >> "$log" 2>&1
    tail -1 "$log"
  done
fi
if [[ " $stages " == *" t "* ]]; then
  stage "t tune Triton tiles" 60 python -m benchmarks.gpu_tune "$out/tune.jsonl" >> "$log" 2>&1
  best="$(grep -o 'FASTDML_TRITON_TILE=[0-9,]*' "$log" | tail -1)"
  [[ -n "$best" ]] && export "${best?}" && echo "$best"
fi
if [[ " $stages " == *" c "* ]]; then
  FASTDML_GPU_SHAPES=core FASTDML_GPU_LOG="$out/gpu_core.jsonl" stage "c core benchmarks" 170 \
    python -m pytest benchmarks/test_gpu.py --benchmark-enable -q -p no:cacheprovider \
    >> "$log" 2>&1
  tail -3 "$log"
  python -m benchmarks.gpu_report "$out/gpu_core.jsonl"
fi
if [[ " $stages " == *" d "* ]]; then
  # pytest-xdist and pytest-timeout are in the GPU machines' image.
  # -v: each test's outcome is written as it ends, so a time limit still shows which failed.
  stage "d cuda-marked tests" "${TESTS_LIMIT:-60}" python -m pytest tests -m cuda -v \
    -p no:cacheprovider -n 8 --timeout 60 > "$out/tests.log" 2>&1
  grep -c PASSED "$out/tests.log"; grep -E "FAILED|ERROR" "$out/tests.log" | head
  tail -3 "$out/tests.log"
fi
if [[ " $stages " == *" s "* ]]; then
  stage "s small shapes" 90 python -m benchmarks.gpu_small_shapes "$out/gpu_small_shapes.jsonl" \
    >> "$log" 2>&1
  tail -20 "$log"
fi
if [[ " $stages " == *" e "* ]]; then
  FASTDML_GPU_SHAPES=rest FASTDML_GPU_LOG="$out/gpu_rest.jsonl" stage "e other benchmarks" 300 \
    python -m pytest benchmarks/test_gpu.py --benchmark-enable -q -p no:cacheprovider \
    >> "$log" 2>&1
fi
if [[ " $stages " == *" l "* ]]; then
  stage "l stacked ResNet-32 cohort" 150 python -m benchmarks.trainer_overhead --stacked resnet32 \
    --device cuda --batch-size 128 --repeats 10 --out "$out/trainer_stacked_gpu.json" >> "$log" 2>&1
  tail -3 "$log"
  stage "l fused linear loss" 150 python -m benchmarks.gpu_linear "$out/gpu_linear.jsonl" \
    >> "$log" 2>&1
  tail -3 "$log"
  stage "l fused linear JSD(0.5)" 150 python -m benchmarks.gpu_linear "$out/gpu_linear.jsonl" \
    --beta 0.5 >> "$log" 2>&1
  tail -3 "$log"
fi
if [[ " $stages " == *" f "* ]]; then
  stage "f loss family" 240 python -m benchmarks.gpu_family "$out/gpu_family.jsonl" >> "$log" 2>&1
  tail -3 "$log"
fi
if [[ " $stages " == *" n "* ]]; then
  for dtype in float32 bfloat16; do
    stage "n ncu forward ($dtype)" 120 ncu --clock-control none --csv \
      --kernel-name regex:mutual_loss_kernel --launch-skip 1 --launch-count 1 \
      --metrics "$(python -m benchmarks.gpu_ncu metrics)" \
      python -m benchmarks.gpu_ncu run "$dtype" > "$out/ncu_$dtype.csv" 2>> "$log"
  done
  python -m benchmarks.gpu_ncu summarize "$out"/ncu_*.csv | tee "$out/ncu.jsonl"
fi
echo
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $status
