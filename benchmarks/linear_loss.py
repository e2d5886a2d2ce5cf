"""The fused linear mutual loss on the CPU against the unfused path and the eager per-pair loop.

From the repository root:

    python -m benchmarks.linear_loss --out benchmarks/results/linear_loss.json

One training step's loss, forward and backward, from K peers' last hidden states [N, H] and
output layers [V, H] (float32) to the gradients of both:

- ``fused``: ``fastdml.fused_linear_mutual_loss`` with its default chunk size;
- ``unfused``: ``F.linear`` per peer, then ``fastdml.mutual_loss`` of the K logits (the C++ op);
- ``eager_pairs``: ``F.linear`` per peer, then the per-pair loop of public DML code
  (cross-entropy plus ``F.kl_div(log_softmax(z_i), softmax(z_j).detach(), "batchmean")`` over
  the other peers j, divided by K - 1, summed over the peers i).

Time: one process per shape runs a warm-up step of each candidate (and checks that they agree on
the loss), then --rounds rounds of one step of each, alternating, so that a load that comes and
goes shifts them alike; the ratios are the medians of the ratios within each round. Memory: one
fresh process per candidate, as in benchmarks/peak_memory.py: VmHWM - VmRSS around one step
after a warm-up, with glibc told to map every block of 64 KiB or more on its own, so the peak
extra includes the gradients the step returns (gradients are set to None before every step).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.peak_memory import (
    M_MMAP_THRESHOLD,
    MMAP_THRESHOLD,
    _status_kib,
    run_in_subprocess,
)

ROOT = Path(__file__).resolve().parent.parent
# (K peers, N rows, H hidden width, V classes)
SHAPES = [(2, 2048, 512, 32000), (4, 1024, 256, 32000)]
CANDIDATES = ("fused", "unfused", "eager_pairs")


def _inputs(k: int, n: int, h: int, v: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(n, h, generator=generator).requires_grad_() for _ in range(k)]
    weight = [(torch.randn(v, h, generator=generator) / h**0.5).requires_grad_() for _ in range(k)]
    target = torch.randint(0, v, (n,), generator=generator)
    return hidden, weight, target


def _eager_pairs(logits, target):
    import torch.nn.functional as F

    k = len(logits)
    total = 0
    for i, z in enumerate(logits):
        log_q = F.log_softmax(z, dim=1)
        targets = (F.softmax(logits[j], dim=1).detach() for j in range(k) if j != i)
        mimicry = sum(F.kl_div(log_q, t, reduction="batchmean") for t in targets)
        total = total + F.cross_entropy(z, target) + mimicry / (k - 1)
    return total


def _step(name: str, hidden, weight, target):
    import torch.nn.functional as F

    import fastdml

    if name == "fused":
        return fastdml.fused_linear_mutual_loss(hidden, weight, target)
    logits = [F.linear(h, w) for h, w in zip(hidden, weight, strict=True)]
    if name == "unfused":
        return fastdml.mutual_loss(logits, target)
    return _eager_pairs(logits, target)


def _stepper(name: str, hidden, weight, target):
    """One step of `name`, from fresh gradients; returns its loss."""

    def step() -> float:
        for tensor in hidden + weight:
            tensor.grad = None
        loss = _step(name, hidden, weight, target)
        loss.backward()
        return loss.item()

    return step


def measure_memory(shape: tuple[int, int, int, int], name: str) -> dict[str, object]:
    """Runs in the child process: the peak extra resident memory of one step after a warm-up."""
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    from benchmarks import cases

    cases.set_threads()
    hidden, weight, target = _inputs(*shape)
    step = _stepper(name, hidden, weight, target)
    step()
    for tensor in hidden + weight:
        tensor.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    before = _status_kib("VmRSS")
    step()
    peak_extra = (_status_kib("VmHWM") - before) * 1024
    return {"shape": list(shape), "candidate": name, "peak_extra_bytes": peak_extra}


def measure_time(shape: tuple[int, int, int, int], rounds: int) -> dict[str, object]:
    """Runs in the child process: every candidate's step times, the candidates alternating step
    by step (the first in each round rotates), after one warm-up step each."""
    import torch

    from benchmarks import cases

    cases.set_threads()
    hidden, weight, target = _inputs(*shape)
    steps = {name: _stepper(name, hidden, weight, target) for name in CANDIDATES}
    losses = {name: step() for name, step in steps.items()}
    if max(losses.values()) - min(losses.values()) > 1e-4 * abs(losses["unfused"]):
        raise RuntimeError(f"the candidates disagree on the loss at {shape}: {losses}")
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for round_ in range(rounds):
        for name in CANDIDATES[round_ % 3 :] + CANDIDATES[: round_ % 3]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {"shape": list(shape), "threads": torch.get_num_threads(), "times_s": times}


def _summary(shape, times: dict[str, list[float]], memory: dict[str, int]) -> dict[str, object]:
    """Medians, and the fused step's time over each other candidate's, paired per round."""
    summary: dict[str, object] = {"shape": list(shape)}
    for name in CANDIDATES:
        summary[f"{name}_median_s"] = statistics.median(times[name])
        summary[f"{name}_peak_extra_mib"] = memory[name] / 2**20
    for other in CANDIDATES[1:]:
        ratios = [a / b for a, b in zip(times["fused"], times[other], strict=True)]
        summary[f"fused_over_{other}_time"] = statistics.median(ratios)
        summary[f"fused_over_{other}_memory"] = memory["fused"] / memory[other]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/linear_loss.json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--case", help="K,N,H,V,memory,CANDIDATE or K,N,H,V,time,ROUNDS: measure, print JSON"
    )
    args = parser.parse_args()
    if args.case:
        *shape, what, argument = args.case.split(",")
        shape = tuple(map(int, shape))
        if what == "memory":
            print(json.dumps(measure_memory(shape, argument)))
        else:
            print(json.dumps(measure_time(shape, int(argument))))
        return

    from benchmarks import machine

    report = {**machine.report_head(rounds=args.rounds), "results": [], "summary": []}
    for shape in SHAPES:
        prefix = ",".join(map(str, shape))
        memory = {}
        for name in CANDIDATES:
            report["results"].append(
                run_in_subprocess("benchmarks.linear_loss", f"{prefix},memory,{name}")
            )
            memory[name] = report["results"][-1]["peak_extra_bytes"]
        report["results"].append(
            run_in_subprocess("benchmarks.linear_loss", f"{prefix},time,{args.rounds}")
        )
        report["summary"].append(_summary(shape, report["results"][-1]["times_s"], memory))
        report["summary"][-1]["load_average_after"] = os.getloadavg()
        print(json.dumps(report["summary"][-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
