"""One optimizer for a whole cohort: a param group per peer, stepped together.

Each peer keeps its own hyper-parameters (learning rate, momentum, weight decay, schedule) in its
own param group. The step, zero_grad, gradient clipping and learning-rate schedule then run once
for the cohort with torch's multi-tensor (foreach) kernels, instead of a Python loop over K
optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# What a bare name means: SGD as in the paper (Nesterov momentum 0.9, weight decay 5e-4).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
}
OptimizerFactory = Callable[..., Optimizer]


def make_optimizer(
    optimizer: str | OptimizerFactory,
    peers: Sequence[nn.Module],
    *,
    options: Mapping[str, Any] | None = None,
    peer_options: Sequence[Mapping[str, Any]] | None = None,
) -> Optimizer:
    """One optimizer with one param group per peer, in order; group k has ``"peer": k``.

    Args:
        optimizer: "sgd", "adam", "adamw", or a factory called as ``factory(groups, **options)``
            (an optimizer class, or a `functools.partial` of one).
        options: keyword options shared by every peer; for a name, they override its defaults,
            and ``foreach=True`` is set unless ``fused`` is given.
        peer_options: one mapping per peer of options for that peer's group only (its own lr,
            weight decay, momentum, ...); they override `options`.
    """
    options = dict(options or {})
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        options = {**DEFAULT_OPTIONS[optimizer], **options}
        if not options.get("fused"):
            options.setdefault("foreach", True)
        optimizer = OPTIMIZERS[optimizer]
    if peer_options is not None and len(peer_options) != len(peers):
        raise ValueError(
            f"peer_options must have one mapping per peer ({len(peers)}), got {len(peer_options)}"
        )
    groups = []
    for k, peer in enumerate(peers):
        params = [p for p in peer.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"peer {k} has no trainable parameters")
        groups.append({"params": params, "peer": k, **(peer_options[k] if peer_options else {})})
    return optimizer(groups, **options)


def clip_grad_norms_(optimizer: Optimizer, max_norms: Sequence[float | None]) -> Tensor:
    """Clips each param group's gradients to its own total 2-norm ``max_norms[g]`` (None: not
    clipped), like `torch.nn.utils.clip_grad_norm_` per peer.

    One foreach norm and at most one foreach scaling per group, with no host synchronisation.
    Returns the groups' norms before clipping, [G] float32 (0 for a group without gradients).
    """
    if len(max_norms) != len(optimizer.param_groups):
        raise ValueError(
            f"max_norms must have one entry per param group ({len(optimizer.param_groups)}), "
            f"got {len(max_norms)}"
        )
    norms = []
    for group, max_norm in zip(optimizer.param_groups, max_norms, strict=True):
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            norms.append(torch.zeros((), device=group["params"][0].device))
            continue
        per_tensor = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        norm = torch.linalg.vector_norm(torch.stack(per_tensor))
        if max_norm is not None:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        norms.append(norm)
    return torch.stack([n.to(norms[0].device) for n in norms])


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate factor per epoch, for `torch.optim.lr_scheduler.LambdaLR`.

    A callable object rather than a lambda, so the scheduler's state_dict holds it and a
    checkpoint restores it. `kind`: "constant"; "cosine" (from 1 at epoch 0 towards 0 at
    `epochs`); "multistep" (times `gamma` at each epoch in `milestones`, as in the paper's
    CIFAR runs).
    """

    kind: str = "constant"
    epochs: int = 1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    KINDS = ("constant", "cosine", "multistep")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"lr schedule must be one of {self.KINDS}, got {self.kind!r}")
        if self.epochs < 1:
            raise ValueError(f"a schedule needs epochs >= 1, got {self.epochs}")

    def __call__(self, epoch: int) -> float:
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))
        if self.kind == "multistep":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        return 1.0


def make_scheduler(
    optimizer: Optimizer,
    schedules: Callable[[int], float] | Sequence[Callable[[int], float] | None],
) -> LambdaLR:
    """One per-epoch `LambdaLR` for the cohort: a factor function per peer group (None: 1)."""
    if callable(schedules):
        schedules = [schedules] * len(optimizer.param_groups)
    if len(schedules) != len(optimizer.param_groups):
        raise ValueError(
            f"lr_schedule must be one callable or one per trainable peer "
            f"({len(optimizer.param_groups)}), got {len(schedules)}"
        )
    return LambdaLR(optimizer, [s if s is not None else LRSchedule() for s in schedules])
