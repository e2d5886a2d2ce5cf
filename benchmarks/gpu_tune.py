"""Measures the Triton kernel's tile choices on the GPU and prints the best as FASTDML_TRITON_TILE.

    python -m benchmarks.gpu_tune OUT/tune.jsonl

For each (most warps of a program, registers of a thread) choice, the forward + backward median
(CUDA events) of the Triton backend at the shapes of the GPU targets; the choice with the least
geometric mean of times wins. The registers decide the persistent grid (the programs resident at
once). benchmarks/gpu.sh runs the benchmarks with it; the winner measured on an H100/H200 is
the default in fastdml/kernels (kernels/mutual_loss.py), written there by hand.
"""

from __future__ import annotations

import json
import math
import sys

import torch
from triton.testing import do_bench

import fastdml
from fastdml.kernels import mutual_loss as km

CHOICES = [(4, 128), (8, 128), (2, 128), (4, 96), (4, 168), (8, 64), (4, 255)]
SHAPES = [
    ((4, 4096, 1000), torch.float32),
    ((4, 2048, 8192), torch.float32),
    ((4, 8192, 32000), torch.float32),
    ((4, 8192, 32000), torch.bfloat16),
    ((2, 8192, 128256), torch.bfloat16),
]


def _median_ms(shape, dtype) -> float:
    k, n, c = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (2 * torch.randn(k, n, c, device="cuda", generator=generator)).to(dtype)
    target = torch.randint(0, c, (n,), device="cuda", generator=generator)
    z = logits.requires_grad_()

    def call():
        fastdml.mutual_loss(z, target, backend="triton").backward()

    call()
    return do_bench(call, grad_to_none=[z], return_mode="median")


def main(path: str) -> None:
    times: dict[tuple[int, int], list[float]] = {}
    with open(path, "a") as file:
        for choice in CHOICES:
            km._MAX_WARPS, km._REGISTERS = choice
            times[choice] = []
            for shape, dtype in SHAPES:
                median_ms = _median_ms(shape, dtype)
                times[choice].append(median_ms)
                record = dict(tile=choice, shape=shape, dtype=str(dtype)[6:], median_ms=median_ms)
                file.write(json.dumps(record) + "\n")
                file.flush()
                print(json.dumps(record), flush=True)
    score = {choice: math.exp(sum(map(math.log, ts)) / len(ts)) for choice, ts in times.items()}
    best = min(score, key=score.get)
    print(f"FASTDML_TRITON_TILE={best[0]},{best[1]}")


if __name__ == "__main__":
    main(sys.argv[1])
