#!/usr/bin/env bash
# The CPU benchmarks end to end: timings, peak memory, then BENCHMARKS.md and the plot.
# Run from anywhere, on an otherwise idle machine. FASTDML_BENCH_QUICK=1: small shapes only.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest benchmarks/test_cpu.py --benchmark-enable \
    --benchmark-json=benchmarks/results/cpu.json
python -m benchmarks.peak_memory --out benchmarks/results/memory.json
python -m benchmarks.report
