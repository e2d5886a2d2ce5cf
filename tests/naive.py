"""The DML loss written naively from its definition: a float64 loop over peers and pairs.

Independent of fastdml's code on purpose; every backend is checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl(p, log_p, log_q):
    """KL(p || q) over the class dim 1, per row, with 0 log 0 = 0 (and its gradient)."""
    return (p * torch.where(p > 0, log_p - log_q, 0)).sum(1)


def _divergence(divergence, beta, t, log_q):
    """D(t, q) per row: t a constant, q = exp(log_q) the peer's, with its gradient."""
    t = t.detach()
    log_t = t.log()
    q = log_q.exp()
    if divergence == "kl" or (divergence == "jsd" and beta == 0):
        return _kl(t, log_t, log_q)
    if divergence == "reverse_kl" or beta == 1:
        return _kl(q, log_q, log_t)
    m = beta * t + (1 - beta) * q
    log_m = torch.where(m > 0, m, 1).log()
    return beta * _kl(t, log_t, log_m) + (1 - beta) * _kl(q, log_q, log_m)


def naive_mutual_loss(
    peers,
    target,
    *,
    temperature=1.0,
    alpha=1.0,
    mode="pairwise",
    peer_weights=None,
    label_smoothing=0.0,
    ignore_index=-100,
    reduction="mean",
    divergence="kl",
    beta=0.5,
    ce_weight=1.0,
    normalizer=None,
    mimic_unlabeled=False,
):
    """Returns (loss, ce, mimicry) like `mutual_loss(..., return_components=True)`."""
    z = [p.double() for p in peers]
    k, t = len(z), temperature
    if target is None:
        target = torch.full(z[0].shape[:1], ignore_index)
        mimic_unlabeled = True
    labeled = target != ignore_index
    mimicked = torch.ones_like(labeled) if mimic_unlabeled else labeled
    log_q = [F.log_softmax(zk / t, dim=1) for zk in z]

    def d(target_prob, i):
        return _divergence(divergence, beta, target_prob, log_q[i])

    ces, mims = [], []
    for i in range(k):
        ce = F.cross_entropy(
            z[i],
            torch.where(labeled, target, 0),
            label_smoothing=label_smoothing,
            reduction="none",
        )
        others = [j for j in range(k) if j != i]
        if peer_weights is not None:
            mim = sum(float(peer_weights[i][j]) * d(log_q[j].exp(), i) for j in others)
        elif mode == "pairwise":
            mim = sum(d(log_q[j].exp(), i) for j in others) / (k - 1)
        elif mode == "ensemble":
            mim = d(sum(log_q[j].exp() for j in others) / (k - 1), i)
        else:  # ensemble_logits
            mean_z = sum(z[j] for j in others) / (k - 1)
            mim = d(F.softmax(mean_z / t, dim=1), i)
        ces.append(torch.where(labeled, ce, 0) if ce_weight else torch.zeros_like(ce))
        mims.append(torch.where(mimicked, mim, 0))
    ce, mim = torch.stack(ces), torch.stack(mims)
    loss = ce_weight * ce + alpha * t * t * mim
    if reduction == "none":
        return loss, ce.detach(), mim.detach()
    dims = tuple(range(1, loss.dim()))
    ce, mim = ce.sum(dims), mim.sum(dims)
    if reduction == "mean":
        if normalizer is not None:
            ce, mim = ce / float(normalizer), mim / float(normalizer)
        else:
            ce, mim = ce / max(int(labeled.sum()), 1), mim / max(int(mimicked.sum()), 1)
    loss = (ce_weight * ce + alpha * t * t * mim).sum()
    return loss, ce.detach(), mim.detach()
