"""What is benchmarked: shapes, dtypes, passes, thread count and the inputs, shared by the timing
(test_cpu.py) and the memory measurement (peak_memory.py).

Environment:
    FASTDML_BENCH_THREADS  torch threads (default 2)
    FASTDML_BENCH_QUICK=1  only the two small shapes and a small sweep (C <= 1000), to try the suite
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

THREADS = int(os.environ.get("FASTDML_BENCH_THREADS", "2"))
QUICK = os.environ.get("FASTDML_BENCH_QUICK", "") == "1"

# (K peers, N rows, C classes)
SHAPES = [(2, 128, 100), (4, 256, 1000), (8, 256, 1000), (4, 1024, 32000)]
TARGET_SHAPE = (4, 1024, 32000)  # the shape of the speed and memory targets, in float32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = ("forward", "forward_backward")

# The "time vs C per K" sweep: forward + backward, float32, N rows.
SWEEP_N = 256
SWEEP_K = (2, 4, 8)
SWEEP_C = (100, 1000, 10000, 32000)
SWEEP_EAGER_MAX_C = 1000  # the eager per-pair loop is slow; it is swept at small C only

if QUICK:
    SHAPES = SHAPES[:2]
    SWEEP_C = SWEEP_C[:2]


def set_threads() -> None:
    torch.set_num_threads(THREADS)


def shape_id(shape: tuple[int, int, int]) -> str:
    k, n, c = shape
    return f"K{k}-N{n}-C{c}"


@functools.lru_cache(maxsize=1)
def inputs(shape: tuple[int, int, int], dtype: str) -> tuple[Tensor, Tensor]:
    """Random logits [K, N, C] of `dtype` (scale 2, the peers differ) and targets [N]; the same for
    the same arguments, in every process."""
    k, n, c = shape
    generator = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(k, n, c, generator=generator)).to(DTYPES[dtype])
    target = torch.randint(0, c, (n,), generator=generator)
    return logits, target
