"""The loss family's divergences on the CPU: the fused C++ op against torch.compile and TRL.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.loss_family --out benchmarks/results/loss_family.json

For each divergence (``kl``, ``reverse_kl``, ``jsd`` with beta 0.5) at each shape (K peers, N
rows, C classes; float32), one forward + backward (``loss.backward()`` on logits that require
grad) of the mutual mimicry loss of distillation: no cross-entropy, T = 1, each peer's target the
other peers (``mode="pairwise"``), each peer's mean over the rows, summed over the peers:

- ``fastdml``: ``fastdml.mutual_loss(logits, None, ce_weight=0, divergence=..., backend="cpp")``;
- ``torch_compile``: `plain_loss`, the same loss written in plain PyTorch from its definition
  (every pair's divergence of the peers' softmaxes, the target detached), under
  ``torch.compile``;
- at K = 2 only, ``trl_compile`` and ``trl_eager``: TRL's ``GKDTrainer.generalized_jsd_loss``
  (`trl_generalized_jsd`; beta 0 is its forward KL, 1 its reverse KL) once per peer, each peer
  the student of the other, detached, peer: the same loss; compiled and as it is.

Every candidate is first checked against fastdml's pure-PyTorch backend in float64 (the loss and
the gradient, benchmarks/candidates.py's tolerances), then warmed up (compiled), then timed in
--rounds rounds that take the candidates in a fresh random order each round, so that a load that
comes and goes reaches them alike. Reported: each candidate's median, and fastdml's time over each
other candidate's, the median of the ratios within a round. The markdown table is printed;
--markdown writes it to a file too.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fastdml
from benchmarks import candidates, cases, machine

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(2, 4096, 32000), (4, 512, 32000)]  # (K peers, N rows, C classes)
DIVERGENCES = {"kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # and TRL's beta for each
BETA = DIVERGENCES["jsd"]
ROUNDS = 5


def plain_loss(logits: Tensor, divergence: str) -> Tensor:
    """sum_k 1 / (K - 1) sum_{j != k} mean_rows D(q_j, q_k): each pair's divergence from its
    definition (docs/loss.md), the target q_j a constant. The JSD's mixture m carries gradient."""
    k, n, _ = logits.shape
    log_q = F.log_softmax(logits, dim=-1)
    q = log_q.exp()
    total = logits.new_zeros(())
    for student in range(k):
        s, log_s = q[student], log_q[student]
        for teacher in range(k):
            if teacher == student:
                continue
            t, log_t = q[teacher].detach(), log_q[teacher].detach()
            if divergence == "kl":  # KL(t || s)
                terms = t * (log_t - log_s)
            elif divergence == "reverse_kl":  # KL(s || t)
                terms = s * (log_s - log_t)
            else:  # beta KL(t || m) + (1 - beta) KL(s || m)
                log_m = (BETA * t + (1 - BETA) * s).log()
                terms = BETA * t * (log_t - log_m) + (1 - BETA) * s * (log_s - log_m)
            total = total + terms.sum()
    return total / ((k - 1) * n)


def trl_generalized_jsd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """TRL's generalized JSD of a student's and a teacher's logits [N, C] at T = 1, averaged
    over the rows: the formula of ``GKDTrainer.generalized_jsd_loss`` in TRL's
    trl/trainer/gkd_trainer.py (huggingface/trl, 2025). The log of the mixture
    m = beta t + (1 - beta) s is a logsumexp of the two shifted log-probabilities, and each KL an
    ``F.kl_div`` with log targets; beta 0 and 1 are the two KLs themselves."""
    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    if beta == 0:  # KL(t || s)
        terms = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    elif beta == 1:  # KL(s || t)
        terms = F.kl_div(log_t, log_s, reduction="none", log_target=True)
    else:
        weights = torch.tensor([1 - beta, beta], dtype=log_s.dtype)
        log_m = torch.logsumexp(torch.stack([log_s, log_t]) + weights.log()[:, None, None], dim=0)
        kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True)
        kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True)
        terms = beta * kl_t + (1 - beta) * kl_s
    return terms.sum() / student.shape[0]


def trl_mutual(logits: Tensor, beta: float) -> Tensor:
    """Two peers, each TRL's student of the other (the teacher's logits detached)."""
    return trl_generalized_jsd(logits[0], logits[1].detach(), beta) + trl_generalized_jsd(
        logits[1], logits[0].detach(), beta
    )


def _candidates(k: int, divergence: str) -> dict[str, Callable[[Tensor, Tensor | None], Tensor]]:
    """The candidates at K peers, each ``(logits, target) -> loss`` (the target is None)."""
    beta = DIVERGENCES[divergence]
    fused = functools.partial(
        fastdml.mutual_loss, ce_weight=0.0, divergence=divergence, beta=BETA, backend="cpp"
    )
    torch._dynamo.reset()  # the last case's graphs: no recompile limit is reached
    plain = torch.compile(functools.partial(plain_loss, divergence=divergence), dynamic=False)
    found = {
        "fastdml": lambda logits, target: fused(logits, target),
        "torch_compile": lambda logits, target: plain(logits),
    }
    if k == 2:
        trl = functools.partial(trl_mutual, beta=beta)
        compiled_trl = torch.compile(trl, dynamic=False)
        found["trl_compile"] = lambda logits, target: compiled_trl(logits)
        found["trl_eager"] = lambda logits, target: trl(logits)
    return found


def _forward_backward(candidate: Callable, logits: Tensor) -> float:
    """Seconds of one forward + backward (the fresh leaf is made outside the clock)."""
    z = logits.detach().requires_grad_()
    start = time.perf_counter()
    candidate(z, None).backward()
    return time.perf_counter() - start


def measure(shape: tuple[int, int, int], divergence: str, rounds: int) -> dict[str, object]:
    """Every candidate's forward + backward times at `shape` for `divergence`, interleaved, after
    its check against the float64 reference and its warm-up."""
    logits, _ = cases.inputs(shape, "float32")
    options = dict(ce_weight=0.0, divergence=divergence, beta=BETA)
    expected = candidates.reference(logits, None, **options)
    chosen = _candidates(shape[0], divergence)
    errors = {}
    for name, candidate in chosen.items():
        errors[name] = candidates.check(candidate, logits, None, expected)
        candidates.warm_up(candidate, logits, None)
    names = list(chosen)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            times[name].append(_forward_backward(chosen[name], logits))
    ratios = {
        other: statistics.median(a / b for a, b in zip(times["fastdml"], times[other], strict=True))
        for other in chosen
        if other != "fastdml"
    }
    return {
        "shape": list(shape),
        "options": options,
        "errors": errors,
        "times_s": times,
        "median_s": {name: statistics.median(samples) for name, samples in times.items()},
        "fastdml_over": ratios,
    }


COLUMNS = ("fastdml", "torch_compile", "trl_compile", "trl_eager")


def markdown(results: list[dict]) -> str:
    """One row per shape and divergence: the medians, and fastdml's time over the others'."""
    others = COLUMNS[1:]
    header = ["K, N, C", "divergence", *(f"{name} ms" for name in COLUMNS)]
    header += [f"fastdml / {name}" for name in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        medians, ratios = result["median_s"], result["fastdml_over"]
        row = [", ".join(map(str, result["shape"])), result["options"]["divergence"]]
        row += [f"{medians[name] * 1e3:.1f}" if name in medians else "" for name in COLUMNS]
        row += [f"{ratios[name]:.2f}" if name in ratios else "" for name in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _shape(text: str) -> tuple[int, int, int]:
    k, n, c = map(int, text.split(","))
    return k, n, c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/loss_family.json")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--shapes", type=_shape, nargs="+", default=SHAPES, metavar="K,N,C", help="(a quick try)"
    )
    args = parser.parse_args()
    cases.set_threads()
    report = {**machine.report_head(rounds=args.rounds), "results": []}
    for shape in args.shapes:
        for divergence in DIVERGENCES:
            result = measure(shape, divergence, args.rounds)
            report["results"].append(result)
            print(json.dumps({key: result[key] for key in ("shape", "options", "median_s")}))
    report["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report["results"])
    print(table + f"wrote {args.out}")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
