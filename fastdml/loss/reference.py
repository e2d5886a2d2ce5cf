"""The pure-PyTorch backend: the loss of docs/design.md ("The loss"), vectorized over the K peers.

It is the correctness oracle of the fused kernels and runs on any device. Autograd gives the
gradient; the mimicry targets are detached (and so are the peers' entropies where they are
constants), so each peer's loss sends gradient only into its own logits. It computes every option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdml.loss.arguments import MutualLossProblem, accumulation_dtype


def mutual_loss_rows(problem: MutualLossProblem) -> tuple[Tensor, Tensor]:
    """Per-peer, per-row cross-entropy and mimicry, each [K, R]: the cross-entropy 0 at rows
    whose target is ignore_index, the mimicry too unless the problem mimics unlabeled rows."""
    logits, target = problem.logits, problem.target
    k, rows, num_classes = logits.shape
    labeled = target != problem.ignore_index
    mimicked = torch.ones_like(labeled) if problem.mimic_unlabeled else labeled
    # Rows left out are zeroed so that NaN or inf there cannot reach the loss or the gradient.
    z = torch.where(mimicked[:, None], logits.to(accumulation_dtype(logits.dtype)), 0)
    y = torch.where(labeled, target, 0)

    if problem.ce_weight == 0:  # no cross-entropy at all: not even 0 * inf at masked classes
        ce = z.new_zeros(k, rows)
    else:
        ce = F.cross_entropy(
            z.reshape(k * rows, num_classes),
            y.repeat(k),
            label_smoothing=problem.label_smoothing,
            reduction="none",
        ).view(k, rows)

    log_q = F.log_softmax(z / problem.temperature, dim=-1)
    mimicry = _MIMICRY[problem.divergence](problem, z, log_q)
    return torch.where(labeled, ce, 0), torch.where(mimicked, mimicry, 0)


def mutual_loss(problem: MutualLossProblem, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """The loss reduced as asked, and each peer's cross-entropy and mimicry reduced alike
    (detached): "none" [K, R] each; "sum" and "mean" a 0-dim loss and [K] terms. "mean" divides
    each term by the rows it covers (or both by the problem's normalizer)."""
    ce, mimicry = mutual_loss_rows(problem)
    factor = problem.alpha * problem.temperature**2
    if reduction == "none":
        return problem.ce_weight * ce + factor * mimicry, ce.detach(), mimicry.detach()
    ce, mimicry = ce.sum(-1), mimicry.sum(-1)
    if reduction == "mean":
        labeled = problem.target != problem.ignore_index
        mimicked = torch.ones_like(labeled) if problem.mimic_unlabeled else labeled
        if problem.normalizer is not None:
            ce = ce / problem.normalizer
            mimicry = mimicry / problem.normalizer
        else:
            ce = ce / labeled.sum().clamp(min=1)
            mimicry = mimicry / mimicked.sum().clamp(min=1)
    loss = (problem.ce_weight * ce + factor * mimicry).sum()
    return loss, ce.detach(), mimicry.detach()


# ---------------------------------------------------------------------------------------------
# The mimicry term M [K, R] of each divergence, given the logits z and log q = log_softmax(z / T).
# Every target t_k (and its log) is detached.


def _targets(problem: MutualLossProblem, z: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Each peer's target distribution t_k and log t_k [K, R, C] in the modes with one target
    (ensemble, ensemble_logits)."""
    k = z.shape[0]
    if problem.mode == "ensemble":
        t = _sum_of_others(log_q.detach().exp()) / (k - 1)
        return t, t.log()
    log_t = F.log_softmax(_sum_of_others(z.detach()) / ((k - 1) * problem.temperature), dim=-1)
    return log_t.exp(), log_t


def _kl(problem: MutualLossProblem, z: Tensor, log_q: Tensor) -> Tensor:
    """sum_j W[k, j] KL(t_j || q_k), or KL(t_k || q_k) for one target, as sums over the pairs
    in O(K) (docs/design.md, The pairwise sum in O(K))."""
    q = log_q.detach().exp()
    k = z.shape[0]
    if problem.mode in ("pairwise", "ensemble"):
        teacher = (q.sum(0) - q) / (k - 1)  # mean of the other peers' posteriors
    elif problem.mode == "ensemble_logits":
        teacher, log_teacher = _targets(problem, z, log_q)
    else:
        teacher = torch.einsum("kj,jrc->krc", problem.weights, q)

    if problem.mode == "ensemble":
        self_term = torch.xlogy(teacher, teacher).sum(-1)
    elif problem.mode == "ensemble_logits":
        self_term = _p_log_q(teacher, log_teacher).sum(-1)
    else:  # sum_j W[k, j] * h_j with the negative entropies h_j = sum_c q_j log q_j
        self_term = problem.weights @ _p_log_q(q, log_q.detach()).sum(-1)
    return self_term - _p_log_q(teacher, log_q).sum(-1)


def _reverse_kl(problem: MutualLossProblem, z: Tensor, log_q: Tensor) -> Tensor:
    """sum_j W[k, j] KL(q_k || q_j) = sum_c q_k (w_k log q_k - sum_j W[k, j] log q_j), or
    KL(q_k || t_k) for one target."""
    q = log_q.exp()
    if problem.mode in ("ensemble", "ensemble_logits"):
        _, log_t = _targets(problem, z, log_q)
        return (_p_log_q(q, log_q) - _p_log_q(q, log_t)).sum(-1)
    weights, log_q_const = problem.weights, log_q.detach()
    own = weights.sum(1)[:, None, None]
    # sum_j W[k, j] log q_j, -inf where a peer of positive weight has q_j = 0 (never 0 * -inf).
    masked = log_q_const == float("-inf")
    others = torch.einsum("kj,jrc->krc", weights, log_q_const.masked_fill(masked, 0))
    reaches = torch.einsum("kj,jrc->krc", (weights > 0).to(z.dtype), masked.to(z.dtype)) > 0
    others = others.masked_fill(reaches, float("-inf"))
    return (own * _p_log_q(q, log_q)).sum(-1) - _p_log_q(q, others).sum(-1)


def _jsd(problem: MutualLossProblem, z: Tensor, log_q: Tensor) -> Tensor:
    """sum_j W[k, j] D(q_j, q_k), or D(t_k, q_k) for one target, with the generalized JSD
    D(t, s) = beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s (s = q_k, its
    gradient through m too); beta = 0 is KL(t || s), beta = 1 KL(s || t). O(K^2) per class."""
    beta = problem.beta
    if beta == 0:
        return _kl(problem, z, log_q)
    if beta == 1:
        return _reverse_kl(problem, z, log_q)
    q = log_q.exp()
    if problem.mode in ("ensemble", "ensemble_logits"):
        t, log_t = _targets(problem, z, log_q)
        return _jsd_of(t, log_t, q, log_q, beta)
    k = z.shape[0]
    weights = problem.weights
    q_const, log_q_const = q.detach(), log_q.detach()
    terms = [
        sum(
            weights[i, j] * _jsd_of(q_const[j], log_q_const[j], q[i], log_q[i], beta)
            for j in range(k)
            if j != i
        )
        for i in range(k)
    ]
    return torch.stack(terms)


def _jsd_of(t: Tensor, log_t: Tensor, s: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """D(t, s) summed over the classes (the last dim)."""
    m = beta * t + (1 - beta) * s
    log_m = torch.where(m > 0, m, 1).log()  # m = 0 only where t = s = 0: no term, no 1 / 0
    kl_t = _p_log_q(t, log_t) - _p_log_q(t, log_m)
    kl_s = _p_log_q(s, log_s) - _p_log_q(s, log_m)
    return (beta * kl_t + (1 - beta) * kl_s).sum(-1)


_MIMICRY = {"kl": _kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def _sum_of_others(x: Tensor) -> Tensor:
    """out[k] = sum_{j != k} x[j], summed as such: total - own is NaN at -inf logits."""
    zeros = torch.zeros_like(x[:1])
    before = torch.cat([zeros, x[:-1].cumsum(0)])
    after = torch.cat([x[1:].flip(0).cumsum(0).flip(0), zeros])
    return before + after


def _p_log_q(p: Tensor, log_q: Tensor) -> Tensor:
    """p * log_q with 0 * log_q = 0, also where log_q = -inf (a class masked with -inf logits),
    and a gradient with no 0 * inf in it where p = 0."""
    return p * torch.where(p == 0, 0, log_q)
