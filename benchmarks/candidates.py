"""The implementations being compared, and the check each passes before it is timed.

Every candidate is a function ``(logits [K, N, C], target [N]) -> scalar loss`` with the default DML
options (pairwise mimicry, T = 1, alpha = 1, mean reduction):

- ``eager_pairs``: the per-pair loop of public DML code, cross-entropy plus
  ``F.kl_div(log_softmax(z_i), softmax(z_j).detach(), reduction="batchmean")`` over the other peers
  j, divided by K - 1 and summed over the peers i;
- ``torch``: ``fastdml.mutual_loss(..., backend="torch")``, fastdml's pure-PyTorch backend;
- ``torch_compile``: ``torch.compile`` of `vectorized`, the lean vectorized form a user would
  write for these options, compiled once per shape and dtype (see `make`);
- ``cpp``: ``fastdml.mutual_loss(..., backend="cpp")``, the fused C++ op, once it is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import fastdml

Candidate = Callable[[Tensor, Tensor], Tensor]


def eager_pairs(logits: Tensor, target: Tensor) -> Tensor:
    """The loop a user would otherwise write: K cross-entropies and K * (K - 1) KL divergences."""
    k = logits.shape[0]
    peer_losses = []
    for i in range(k):
        log_q_i = F.log_softmax(logits[i], dim=1)
        mimicry = sum(
            F.kl_div(log_q_i, F.softmax(logits[j], dim=1).detach(), reduction="batchmean")
            for j in range(k)
            if j != i
        )
        peer_losses.append(F.cross_entropy(logits[i], target) + mimicry / (k - 1))
    return sum(peer_losses)


def vectorized(logits: Tensor, target: Tensor) -> Tensor:
    """The vectorized form of docs/design.md, "The pairwise sum in O(K)", as a user would write it
    in plain PyTorch (T = 1, alpha = 1, pairwise): the K^2 pair sum collapsed to O(K) work per
    class with S = sum_j q_j."""
    k, n, _ = logits.shape
    z = logits.float()
    ce = F.cross_entropy(z.flatten(0, 1), target.repeat(k)) * k  # each peer's mean, summed
    log_q = F.log_softmax(z, dim=-1)
    q = log_q.detach().exp()
    h = (q * log_q.detach()).sum(-1)  # [K, N]: sum_c q log q, a constant
    cross = ((q.sum(0) - q) * log_q).sum(-1)  # [K, N]: sum_c (S - q_k) log q_k
    return ce + ((h.sum(0) - h) - cross).sum() / ((k - 1) * n)


def torch_backend(logits: Tensor, target: Tensor) -> Tensor:
    """fastdml's pure-PyTorch backend (argument checks, every option)."""
    return fastdml.mutual_loss(logits, target, backend="torch")


def fused_cpp(logits: Tensor, target: Tensor) -> Tensor:
    """fastdml's fused C++ CPU op."""
    return fastdml.mutual_loss(logits, target, backend="cpp")


def names() -> list[str]:
    """The candidates this installation can run, baselines first."""
    available = ["eager_pairs", "torch_compile", "torch"]
    if "cpp" in fastdml.available_backends():
        available.append("cpp")
    return available


def make(name: str) -> Candidate:
    """A fresh candidate. ``torch_compile`` is a new compiled function with static shapes: call it
    (under each grad mode it will be timed in) before timing, so compilation is not timed."""
    if name == "torch_compile":
        torch._dynamo.reset()  # drop the last shape's graphs: no recompile limit is reached
        return torch.compile(vectorized, dynamic=False)
    return {"eager_pairs": eager_pairs, "torch": torch_backend, "cpp": fused_cpp}[name]


def reference(logits: Tensor, target: Tensor | None, **options) -> tuple[float, Tensor]:
    """The loss (float64) and its gradient (float32) by fastdml's torch backend in float64, with
    the default options or `options` (those of a loss whose "mean" averages over all N rows:
    every row labeled, or, without a target, every row mimicked).

    Computed over chunks of rows (the mean-reduced loss is a sum over rows / N), so that float64
    copies of the largest inputs fit in memory.
    """
    k, n, c = logits.shape
    rows_per_chunk = max(1, (1 << 24) // (k * c))
    value = 0.0
    grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        z = logits.detach()[:, rows].double().requires_grad_()
        chunk_target = None if target is None else target[rows]
        loss = fastdml.mutual_loss(z, chunk_target, reduction="sum", backend="torch", **options)
        loss = loss / n
        loss.backward()
        value += loss.item()
        grad[:, rows] = z.grad
    return value, grad


# Relative error allowed against the float64 reference: of the loss value, and of the gradient in
# the 2-norm. bfloat16 rounds the gradient (and, in the eager loop, every intermediate) to 8 bits;
# a wrong formula (a missing 1/(K-1), a gradient into the teacher) is off by far more.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def check(
    candidate: Candidate, logits: Tensor, target: Tensor | None, expected: tuple[float, Tensor]
) -> dict[str, float]:
    """Runs forward and backward once and compares both with `expected` (from `reference`).

    Raises AssertionError if they differ; returns the relative errors of the loss and gradient.
    """
    ref_value, ref_grad = expected
    z = logits.detach().clone().requires_grad_()
    loss = candidate(z, target)
    loss.backward()
    value_error = abs(loss.item() - ref_value) / abs(ref_value)
    grad_error = ((z.grad.float() - ref_grad).norm() / ref_grad.norm()).item()
    tolerance = TOLERANCES[logits.dtype]
    if not (value_error <= tolerance and grad_error <= tolerance):  # also catches NaN
        raise AssertionError(
            f"{getattr(candidate, '__name__', candidate)} differs from the reference: relative "
            f"error {value_error:.2e} in the loss, {grad_error:.2e} in the gradient "
            f"(tolerance {tolerance:.0e})"
        )
    return {"value_error": value_error, "grad_error": grad_error}


def warm_up(candidate: Candidate, logits: Tensor, target: Tensor | None) -> None:
    """One forward under no_grad and one forward + backward: compiles both graphs of
    torch_compile, and leaves every candidate's lazy initialisation out of what is measured."""
    with torch.no_grad():
        candidate(logits, target)
    z = logits.detach().requires_grad_()
    candidate(z, target).backward()
