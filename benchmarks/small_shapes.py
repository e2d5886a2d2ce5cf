"""The mutual loss at the paper's shapes: time, per-call overhead and ops dispatched.

From the repository root, on an otherwise idle machine (writes the JSON that
`python -m benchmarks.report` renders as BENCHMARKS.md's "Small shapes"):

    python -m benchmarks.small_shapes --out benchmarks/results/small_shapes.json

At these shapes (two to four peers, 64 to 128 rows, 10 to 100 classes) a call does little
arithmetic, so what a loss costs is mostly Python, dispatch and autograd. Every candidate runs
forward + backward (``loss.backward()`` on logits that require grad) in rounds that take the
candidates in turn, in a fresh random order each round, so that a change in the machine's load,
and whatever one candidate leaves behind for the next, reaches them all alike; each reports the
median over its rounds.

- ``fastdml``: ``fastdml.mutual_loss(logits, target)``, the function form (backend "auto");
- ``MutualLoss``: the module form, ``fastdml.MutualLoss()(logits, target)``;
- ``torch_compile`` and ``eager_pairs``: the baselines of benchmarks/candidates.py;
- ``kernel``: the fused CPU op called directly in inference mode, computing the loss and writing
  its gradient: the work of a forward + backward without autograd or Python. The per-call overhead
  of a fastdml form is its median minus this one.

Ops dispatched: the ATen and custom ops one forward + backward sends through the dispatcher, as a
`TorchDispatchMode` sees them (the autograd engine's own included).

Interleaving leaves each call to start from caches the other candidates filled, as a loss in a
training step does after the model's forward. The overhead with warm caches is measured too, at
(2, 128, 100): `MutualLoss` and the kernel each called STEADY_CALLS times back to back.

The no-regression row (4, 1024, 32000) times fastdml and torch.compile only, in fewer rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import fastdml
from benchmarks import candidates, cases, machine

SHAPES = [(2, 64, 100), (2, 128, 100), (2, 128, 10), (4, 128, 100)]
LARGE_SHAPE = (4, 1024, 32000)
ROUNDS, LARGE_ROUNDS, WARM_UP = 400, 12, 20
STEADY_SHAPE, STEADY_CALLS = (2, 128, 100), 3000


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _kernel(logits: Tensor, target: Tensor) -> None:
    with torch.inference_mode():
        torch.ops.fastdml.fused_mutual_loss(
            logits, target, None, None, "pairwise", 1.0, 1.0, 0.0, -100, "mean", True
        )


def _candidates() -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    return {
        "fastdml": fastdml.mutual_loss,
        "MutualLoss": fastdml.MutualLoss(),
        "torch_compile": candidates.make("torch_compile"),
        "eager_pairs": candidates.eager_pairs,
    }


def _forward_backward(candidate: Callable, logits: Tensor, target: Tensor) -> float:
    """Seconds of one forward + backward (the fresh leaf is made outside the clock)."""
    z = logits.detach().requires_grad_()
    start = time.perf_counter()
    candidate(z, target).backward()
    return time.perf_counter() - start


def _kernel_seconds(logits: Tensor, target: Tensor) -> float:
    start = time.perf_counter()
    _kernel(logits, target)
    return time.perf_counter() - start


def _ops_dispatched(candidate: Callable, logits: Tensor, target: Tensor) -> list[str]:
    z = logits.detach().requires_grad_()
    with _CountOps() as counted:
        candidate(z, target).backward()
    return counted.ops


def measure(shape: tuple[int, int, int], names: list[str], rounds: int) -> dict:
    """Medians (seconds) of `names` (and of the kernel) at `shape`, float32, in interleaved
    rounds, and the ops each dispatches."""
    logits, target = cases.inputs(shape, "float32")
    expected = candidates.reference(logits, target)
    every = _candidates()
    chosen = {name: every[name] for name in names}
    for candidate in chosen.values():
        candidates.check(candidate, logits, target, expected)
        candidates.warm_up(candidate, logits, target)
    timers = {
        **{name: functools.partial(_forward_backward, c) for name, c in chosen.items()},
        "kernel": _kernel_seconds,
    }
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for round_ in range(rounds + WARM_UP):
        order.shuffle(names)
        for name in names:
            seconds = timers[name](logits, target)
            if round_ >= WARM_UP:
                times[name].append(seconds)
    result = {"K": shape[0], "N": shape[1], "C": shape[2], "rounds": rounds, "candidates": {}}
    for name, samples in times.items():
        entry = {"median": statistics.median(samples)}
        if name in chosen:
            entry["ops"] = _ops_dispatched(chosen[name], logits, target)
        result["candidates"][name] = entry
    return result


def measure_steady(shape: tuple[int, int, int]) -> dict:
    """Medians (seconds) of `MutualLoss` forward + backward and of the kernel, each called
    back to back: the per-call overhead with warm caches."""
    logits, target = cases.inputs(shape, "float32")
    criterion = fastdml.MutualLoss()
    timers = {
        "MutualLoss": functools.partial(_forward_backward, criterion),
        "kernel": _kernel_seconds,
    }
    medians = {}
    for name, timer in timers.items():
        samples = [timer(logits, target) for _ in range(STEADY_CALLS + WARM_UP)]
        medians[name] = statistics.median(samples[WARM_UP:])
    return {"K": shape[0], "N": shape[1], "C": shape[2], "calls": STEADY_CALLS, **medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/small_shapes.json"))
    args = parser.parse_args()
    cases.set_threads()
    runs = [measure(shape, list(_candidates()), ROUNDS) for shape in SHAPES]
    large = measure(LARGE_SHAPE, ["fastdml", "torch_compile"], LARGE_ROUNDS)
    steady = measure_steady(STEADY_SHAPE)
    record = {"machine": machine.describe(), "shapes": runs, "large": large, "steady": steady}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for run in [*runs, large]:
        medians = {name: f"{c['median'] * 1e6:.0f} us" for name, c in run["candidates"].items()}
        print((run["K"], run["N"], run["C"]), medians)
    print(
        "back to back:", {name: f"{steady[name] * 1e6:.0f} us" for name in ("MutualLoss", "kernel")}
    )


if __name__ == "__main__":
    main()
