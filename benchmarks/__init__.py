"""fastdml's benchmarks (not part of the test suite; see BENCHMARKS.md for the results).

From the repository root, on an otherwise idle machine (about 15 minutes on 2 cores):

    python -m pytest benchmarks/test_cpu.py --benchmark-enable \\
        --benchmark-json=benchmarks/results/cpu.json
    python -m benchmarks.peak_memory --out benchmarks/results/memory.json
    python -m benchmarks.report

or all three: ``bash benchmarks/run_cpu.sh``. ``FASTDML_BENCH_QUICK=1`` runs only the small shapes,
``FASTDML_BENCH_THREADS`` sets the thread count (default 2).
"""
