"""The mutual loss at the paper's shapes on a GPU: time of forward + backward, and the kernels
one step launches.

    python -m benchmarks.gpu_small_shapes OUTDIR/gpu_small_shapes.jsonl

At (K, N, C) = (2, 64, 100), (2, 128, 100), (2, 128, 10) and (4, 128, 100) (float32) a step's
loss does microseconds of arithmetic, so what it costs is launches, host syncs and Python. For
each shape: ``fastdml`` (``fastdml.mutual_loss``, backend "auto": the CUDA op), ``MutualLoss``
(the module), ``triton`` (``backend="triton"``), and the baselines ``torch_compile`` and
``eager_pairs`` of benchmarks/candidates.py, each checked against the float64 reference first.
Time: `triton.testing.do_bench` of ``loss.backward()`` on fresh logits that require grad (CUDA
events around many calls, so the host's time counts where it is the bottleneck), median. Kernels:
the CUDA kernels and memsets one forward + backward of each candidate launches, from the
profiler. Each result is written as a JSON line as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

import fastdml
from benchmarks import candidates
from benchmarks.small_shapes import SHAPES


def make(name: str) -> candidates.Candidate:
    if name == "fastdml":
        return fastdml.mutual_loss
    if name == "MutualLoss":
        return fastdml.MutualLoss()
    if name == "triton":
        return lambda logits, target: fastdml.mutual_loss(logits, target, backend="triton")
    return candidates.make(name)


def launches(candidate: candidates.Candidate, logits: torch.Tensor, target: torch.Tensor) -> list:
    """The names of the GPU activities (kernels, memsets) of one forward + backward."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        candidate(logits.detach().requires_grad_(), target).backward()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    names = ["fastdml", "MutualLoss", "triton", "torch_compile", "eager_pairs"]
    with args.out.open("a") as out:
        for shape in SHAPES:
            k, n, c = shape
            gen = torch.Generator(device="cuda").manual_seed(0)
            logits = 3 * torch.randn(k, n, c, device="cuda", generator=gen)
            target = torch.randint(0, c, (n,), device="cuda", generator=gen)
            expected = candidates.reference(logits, target)
            for name in names:
                candidate = make(name)
                errors = candidates.check(candidate, logits, target, expected)
                candidates.warm_up(candidate, logits, target)

                def step(candidate=candidate, logits=logits, target=target):
                    candidate(logits.detach().requires_grad_(), target).backward()

                row = {
                    "shape": shape,
                    "candidate": name,
                    "median_us": 1000 * triton.testing.do_bench(step, return_mode="median"),
                    "launches": launches(candidate, logits, target),
                    **errors,
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"{shape} {name}: {row['median_us']:.1f} us, {len(row['launches'])} launches")


if __name__ == "__main__":
    main()
