"""The pure-PyTorch backend: the loss of docs/design.md ("The loss"), vectorized over the K peers.

It is the correctness oracle of the fused kernels and runs on any device. Autograd gives the
gradient; the mimicry targets and the peers' entropies are detached, so each peer's loss sends
gradient only into its own logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdml.loss.arguments import MutualLossProblem, accumulation_dtype


def mutual_loss_rows(problem: MutualLossProblem) -> tuple[Tensor, Tensor]:
    """Per-peer, per-row cross-entropy and mimicry KL, each [K, R] (0 at ignored rows)."""
    logits, target = problem.logits, problem.target
    k, rows, num_classes = logits.shape
    valid = target != problem.ignore_index
    # Ignored rows are zeroed so that NaN or inf there cannot reach the loss or the gradient.
    z = torch.where(valid[:, None], logits.to(accumulation_dtype(logits.dtype)), 0)
    y = torch.where(valid, target, 0)

    ce = F.cross_entropy(
        z.reshape(k * rows, num_classes),
        y.repeat(k),
        label_smoothing=problem.label_smoothing,
        reduction="none",
    ).view(k, rows)

    log_q = F.log_softmax(z / problem.temperature, dim=-1)
    q = log_q.detach().exp()
    if problem.mode in ("pairwise", "ensemble"):
        teacher = (q.sum(0) - q) / (k - 1)  # mean of the other peers' posteriors
    elif problem.mode == "ensemble_logits":
        mean_logits = _sum_of_others(z.detach()) / ((k - 1) * problem.temperature)
        log_teacher = F.log_softmax(mean_logits, dim=-1)
        teacher = log_teacher.exp()
    else:
        teacher = torch.einsum("kj,jrc->krc", problem.weights, q)

    if problem.mode == "ensemble":
        self_term = torch.xlogy(teacher, teacher).sum(-1)
    elif problem.mode == "ensemble_logits":
        self_term = _p_log_q(teacher, log_teacher).sum(-1)
    else:  # sum_j W[k, j] * h_j with the negative entropies h_j = sum_c q_j log q_j
        self_term = problem.weights @ _p_log_q(q, log_q.detach()).sum(-1)
    mimicry = self_term - _p_log_q(teacher, log_q).sum(-1)

    return torch.where(valid, ce, 0), torch.where(valid, mimicry, 0)


def _sum_of_others(x: Tensor) -> Tensor:
    """out[k] = sum_{j != k} x[j], summed as such: total - own is NaN at -inf logits."""
    zeros = torch.zeros_like(x[:1])
    before = torch.cat([zeros, x[:-1].cumsum(0)])
    after = torch.cat([x[1:].flip(0).cumsum(0).flip(0), zeros])
    return before + after


def _p_log_q(p: Tensor, log_q: Tensor) -> Tensor:
    """p * log_q with 0 * log_q = 0, also where log_q = -inf (a class masked with -inf logits)."""
    return torch.where(p == 0, 0, p * log_q)
