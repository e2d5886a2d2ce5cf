"""The DML loss written naively from its definition: a float64 loop over peers and pairs.

Independent of fastdml's code on purpose; every backend is checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl(target_prob, log_prob):
    """KL(target || q) over the class dim 1, per row; targets are constants."""
    t = target_prob.detach()
    return torch.where(t > 0, t * (t.log() - log_prob), 0).sum(1)


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
):
    """Returns (loss, ce, mimicry) like `mutual_loss(..., return_components=True)`."""
    z = [p.double() for p in peers]
    k, t = len(z), temperature
    valid = target != ignore_index
    log_q = [F.log_softmax(zk / t, dim=1) for zk in z]
    ces, mims = [], []
    for i in range(k):
        ce = F.cross_entropy(
            z[i],
            target,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction="none",
        )
        others = [j for j in range(k) if j != i]
        if peer_weights is not None:
            mim = sum(float(peer_weights[i][j]) * _kl(log_q[j].exp(), log_q[i]) for j in range(k))
        elif mode == "pairwise":
            mim = sum(_kl(log_q[j].exp(), log_q[i]) for j in others) / (k - 1)
        elif mode == "ensemble":
            mean_q = sum(log_q[j].exp() for j in others) / (k - 1)
            mim = _kl(mean_q, log_q[i])
        else:  # ensemble_logits
            mean_z = sum(z[j] for j in others) / (k - 1)
            mim = _kl(F.softmax(mean_z / t, dim=1), log_q[i])
        ces.append(torch.where(valid, ce, 0))
        mims.append(torch.where(valid, mim, 0))
    ce, mim = torch.stack(ces), torch.stack(mims)
    loss = ce + alpha * t * t * mim
    if reduction == "none":
        return loss, ce.detach(), mim.detach()
    dims = tuple(range(1, loss.dim()))
    if reduction == "mean":
        n = max(int(valid.sum()), 1)
        loss, ce, mim = loss / n, ce / n, mim / n
    return loss.sum(), ce.sum(dims).detach(), mim.sum(dims).detach()
