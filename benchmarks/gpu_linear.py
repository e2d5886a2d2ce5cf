"""The fused linear mutual loss on a GPU: time and peak memory of one training step's loss.

    python -m benchmarks.gpu_linear OUTDIR/gpu_linear.jsonl

From K = 2 peers' last hidden states [N, H] and output layers [V, H] (bfloat16, N = 16384 tokens,
H = 4096, V = 128256 by default) to the gradients of both, forward and backward:

- ``fused``: ``fastdml.fused_linear_mutual_loss`` with its default chunk size;
- ``unfused``: ``F.linear`` per peer, then ``fastdml.mutual_loss`` of the logits;

both for two trained peers ("mutual") and for a student distilled from a frozen teacher
("frozen_teacher": ``peer_weights=[[0, 1], [0, 0]]``, the teacher's hidden states and weight need
no gradient). In the second setting, when liger_kernel imports, also:

- ``liger_jsd``: ``LigerFusedLinearJSD(jsd_beta=0)``, Liger-Kernel's fused linear KL from the
  teacher, without the student's cross-entropy (with ``--beta``: its generalized JSD(beta));
- ``liger_jsd_ce``: that plus ``LigerFusedLinearCrossEntropyLoss`` of the student, the same terms
  as fastdml's student loss.

``--beta B`` measures the generalized JSD(B) instead of the KL from the teacher: fastdml's
``divergence="jsd", beta=B`` and Liger's ``jsd_beta=B``, whose beta means the same (0 the KL from
the teacher, 1 the reverse KL).

Time: CUDA events around each step after a warm-up, median of --reps. Memory: the peak of
``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it (inputs
and weights), gradients included. Each result is written as a JSON line as soon as it is
measured, so a time limit keeps what ran. ``--device cpu`` runs the same logic on small shapes
(perf_counter times, no memory), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

import fastdml

SHAPE = (2, 16384, 4096, 128256)  # K peers, N tokens, H hidden width, V classes
DISTILLATION = [[0, 1], [0, 0]]  # peer 0 imitates peer 1, a frozen teacher

Step = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], torch.Tensor]


def _divergence(beta: float | None) -> dict[str, object]:
    """fastdml's options for the measured divergence: the KL, or the generalized JSD(beta)."""
    return {} if beta is None else {"divergence": "jsd", "beta": beta}


def _fused(peer_weights, beta: float | None):
    return lambda hidden, weight, target: fastdml.fused_linear_mutual_loss(
        hidden, weight, target, peer_weights=peer_weights, **_divergence(beta)
    )


def _unfused(peer_weights, beta: float | None):
    def step(hidden, weight, target):
        logits = [F.linear(h, w) for h, w in zip(hidden, weight, strict=True)]
        return fastdml.mutual_loss(logits, target, peer_weights=peer_weights, **_divergence(beta))

    return step


def _liger(beta: float | None) -> dict[str, Step]:
    """Liger-Kernel's fused linear losses for the frozen-teacher setting, where it imports."""
    try:
        from liger_kernel.transformers import (
            LigerFusedLinearCrossEntropyLoss,
            LigerFusedLinearJSD,
        )
    except ImportError:
        return {}
    jsd = LigerFusedLinearJSD(jsd_beta=0.0 if beta is None else beta)
    cross_entropy = LigerFusedLinearCrossEntropyLoss()

    def liger_jsd(hidden, weight, target):
        return jsd(hidden[0], weight[0], hidden[1], weight[1], target)

    def liger_jsd_ce(hidden, weight, target):
        return liger_jsd(hidden, weight, target) + cross_entropy(weight[0], hidden[0], target)

    return {"liger_jsd": liger_jsd, "liger_jsd_ce": liger_jsd_ce}


def candidates(setting: str, beta: float | None = None) -> dict[str, Step]:
    peer_weights = DISTILLATION if setting == "frozen_teacher" else None
    found = {"fused": _fused(peer_weights, beta), "unfused": _unfused(peer_weights, beta)}
    if setting == "frozen_teacher":
        found.update(_liger(beta))
    return found


def make_inputs(shape, dtype: torch.dtype, device: str, setting: str):
    """Hidden states of scale 1, weights of scale 1/sqrt(H) (logits of scale 1), targets; in the
    frozen-teacher setting peer 1 needs no gradient."""
    k, n, h, v = shape
    generator = torch.Generator(device).manual_seed(0)
    trained = [True] * k if setting == "mutual" else [True] + [False] * (k - 1)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    hidden = [randn(n, h).requires_grad_(grad) for grad in trained]
    weight = [randn(v, h, scale=h**-0.5).requires_grad_(grad) for grad in trained]
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    return hidden, weight, target


def measure(step: Step, hidden, weight, target, reps: int) -> dict[str, object]:
    """The step's median time and, on a GPU, its peak extra memory."""
    cuda = hidden[0].device.type == "cuda"
    leaves = [tensor for tensor in hidden + weight if tensor.requires_grad]

    def run() -> torch.Tensor:
        for tensor in leaves:
            tensor.grad = None
        loss = step(hidden, weight, target)
        loss.backward()
        return loss.detach()

    loss = float(run())  # the warm-up: compiles kernels, fills the allocator's cache
    times, peak_extra = [], None
    for rep in range(reps):
        for tensor in leaves:
            tensor.grad = None
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            if rep == 0:
                peak_extra = torch.cuda.max_memory_allocated() - before
        else:
            start_s = time.perf_counter()
            run()
            times.append(time.perf_counter() - start_s)
    return {"loss": loss, "median_s": statistics.median(times), "peak_extra_bytes": peak_extra}


def write_record(out: TextIO, record: dict) -> None:
    """Appends a result as a JSON line at once (a time limit keeps what ran) and prints it; on a
    GPU, gives the allocator's cache back for the next candidate."""
    out.write(json.dumps(record) + "\n")
    out.flush()
    print(json.dumps(record), flush=True)
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON lines file to append to")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="K,N,H,V")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--beta", type=float, help="the generalized JSD(beta) instead of the KL")
    args = parser.parse_args()
    shape = tuple(int(size) for size in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for setting in ("mutual", "frozen_teacher"):
            hidden, weight, target = make_inputs(shape, dtype, device, setting)
            for candidate, step in candidates(setting, args.beta).items():
                record = {"bench": "linear_loss", "device": name, "setting": setting}
                record["divergence"] = "kl" if args.beta is None else f"jsd({args.beta})"
                record.update(candidate=candidate, shape=list(shape), dtype=args.dtype)
                try:
                    record.update(measure(step, hidden, weight, target, args.reps))
                except torch.OutOfMemoryError as error:
                    record["error"] = f"out of memory: {error}".splitlines()[0]
                write_record(out, record)
            del hidden, weight, target


if __name__ == "__main__":
    main()
