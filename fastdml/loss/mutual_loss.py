"""The public mutual loss: `mutual_loss` and its module form `MutualLoss`."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fastdml.loss import backends
from fastdml.loss.arguments import Logits, check_target_values, make_problem
from fastdml.loss.options import LossOptions
from fastdml.loss.per_peer import check_peer_inputs, per_peer_losses


class MutualLossOutput(NamedTuple):
    """The loss and, for logging, each peer's two terms reduced like the loss (detached).

    `loss` is a tuple of each peer's loss with ``per_peer=True``. `ce` and `mimicry` are [K] for
    reduction "mean" and "sum", [K, N, d1, ...] for "none"; `mimicry` is the term M_k itself,
    before the alpha * T^2 weight.
    """

    loss: Tensor | tuple[Tensor, ...]
    ce: Tensor
    mimicry: Tensor


def mutual_loss(
    logits: Logits, target: Tensor | None, **options: Any
) -> Tensor | tuple[Tensor, ...] | MutualLossOutput:
    """The Deep Mutual Learning loss of a cohort of K peers.

    For peer k and row n: ``l_kn = ce_weight * CE(z_kn, y_n) + alpha * T**2 * M_kn``, with CE
    exactly ``F.cross_entropy(..., label_smoothing=label_smoothing)`` and, for
    ``q = softmax(z / T)`` and the divergence KL (``divergence="reverse_kl"`` and ``"jsd"`` put
    theirs in its place):

    - ``mode="pairwise"`` (DML): ``M_k = 1/(K-1) * sum_{j != k} KL(q_j || q_k)``;
    - ``mode="ensemble"`` (DML_e): ``M_k = KL(mean_{j != k} q_j || q_k)``;
    - ``mode="ensemble_logits"``: ``M_k = KL(softmax(mean_{j != k} z_j / T) || q_k)``;
    - ``peer_weights=W`` (K x K, overrides mode): ``M_k = sum_j W[k, j] * KL(q_j || q_k)``.

    The mimicry targets are constants, so ``loss.backward()`` sends each peer exactly its own DML
    gradient. Rows whose target is ``ignore_index`` contribute nothing.

    Args:
        logits: [K, N, C] (or [K, N, C, d1, ...]), or a list/tuple of K tensors [N, C] (or
            [N, C, d1, ...]); float32, float64, float16 or bfloat16.
        target: int64 class indices [N] (or [N, d1, ...]), or None for a mimicry-only loss
            (``ce_weight=0``: every row is mimicked). The GPU ops do not range-check targets on
            the host (that would synchronize every call): a row whose target is outside [0, C)
            and not ignore_index gets a NaN loss and gradient.
        options: the fields of `LossOptions` (temperature, alpha, mode, peer_weights,
            label_smoothing, ignore_index, reduction, return_components, per_peer, backend,
            divergence, beta, ce_weight, normalizer, mimic_unlabeled).

    Returns:
        The loss: a 0-dim tensor for reduction "mean" (each peer's mean over its non-ignored rows,
        summed over peers) and "sum", [K, N, d1, ...] for "none". With ``per_peer=True``, a
        tuple of each peer's loss (0-dim, or [N, d1, ...] for "none"). With
        ``return_components=True``, a `MutualLossOutput` (loss, ce, mimicry).

    Example::

        loss = mutual_loss([net(x) for net in peers], y, temperature=2.0)
        loss.backward()

        losses = mutual_loss([net(x) for net in peers], y, per_peer=True)
        for loss, opt in zip(losses, optimizers):  # one peer at a time, as in the paper
            opt.zero_grad()
            loss.backward()
            opt.step()
    """
    options = LossOptions(**options)
    return mutual_loss_with(logits, target, options, options.return_components, options.per_peer)


def mutual_loss_with(
    logits: Logits,
    target: Tensor | None,
    options: LossOptions,
    return_components: bool,
    per_peer: bool = False,
) -> Tensor | tuple[Tensor, ...] | MutualLossOutput:
    """`mutual_loss` with its options checked already: what a call costs beyond the kernels."""
    if per_peer:
        return _per_peer_loss(logits, target, options, return_components)
    problem = make_problem(logits, target, options)
    device = problem.logits.device
    name = backends.select(
        options.backend,
        device,
        problem.num_peers,
        problem.logits.shape[2],
        options.uses_family,
    )
    if backends.needs_target_check(name):
        check_target_values(problem)
    reduction = options.reduction
    loss, ce, mimicry = backends.IMPLEMENTATIONS[name](problem, reduction)
    if reduction == "none":
        shape = (problem.num_peers, *problem.row_shape)
        loss, ce, mimicry = (terms.view(shape) for terms in (loss, ce, mimicry))
    if not return_components:
        return loss
    return MutualLossOutput(loss, ce, mimicry)


def _per_peer_loss(
    logits: Logits, target: Tensor | None, options: LossOptions, return_components: bool
) -> tuple[Tensor, ...] | MutualLossOutput:
    peers = check_peer_inputs("logits", logits)
    out: list[MutualLossOutput] = []

    def loss_of(inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        out.append(mutual_loss_with(inputs, target, options, return_components=True))
        loss, ce, mimicry = out[-1]
        if options.reduction == "none":
            return loss, loss
        factor = options.alpha * options.temperature**2
        return loss, options.ce_weight * ce + factor * mimicry

    losses = per_peer_losses(peers, range(len(peers)), loss_of, _grad_dtype)
    if not return_components:
        return losses
    return MutualLossOutput(losses, out[-1].ce, out[-1].mimicry)


def _grad_dtype(logits: Tensor) -> torch.dtype:
    """float16 gradients are computed in float32: a gradient computed at an upstream gradient of
    1 and scaled later (GradScaler's loss scale) would flush to zero in float16."""
    return torch.float32 if logits.dtype == torch.float16 else logits.dtype


class LossModule(nn.Module):
    """A module that holds a `LossOptions` record, checked once at construction; the base of the
    loss modules. Each option reads and writes as an attribute (``criterion.alpha = 0.5`` makes
    a new record, checked again)."""

    options: LossOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = LossOptions(**options)

    def _apply(self, fn, recurse=True):
        # The peer weights follow the module's moves (`.to`, `.cuda`, `.to("meta")`) as a buffer
        # would; a move is not a new value, so it is not checked again (a meta tensor has none).
        module = super()._apply(fn, recurse)
        if self.options.peer_weights is not None:
            moved = copy.copy(self.options)
            object.__setattr__(moved, "peer_weights", fn(moved.peer_weights))
            self.options = moved
        return module

    def extra_repr(self) -> str:
        o = self.options
        mode = "peer_weights" if o.peer_weights is not None else repr(o.mode)
        return (
            f"mode={mode}, temperature={o.temperature}, alpha={o.alpha}, "
            f"label_smoothing={o.label_smoothing}, reduction={o.reduction!r}, "
            f"backend={o.backend!r}"
        )


def _option_attribute(name: str) -> property:
    def get(self: LossModule) -> Any:
        return getattr(self.options, name)

    def set(self: LossModule, value: Any) -> None:
        self.options = self.options.replace(**{name: value})

    return property(get, set, doc=f"The `LossOptions.{name}` of this loss.")


for _field in dataclasses.fields(LossOptions):
    setattr(LossModule, _field.name, _option_attribute(_field.name))


class MutualLoss(LossModule):
    """`mutual_loss` as a module: ``MutualLoss(**options)(logits, target)``.

    Takes the fields of `LossOptions` as keywords; they are checked here, at construction.

    Example::

        criterion = MutualLoss(temperature=2.0)
        loss = criterion(torch.stack([net(x) for net in peers]), y)  # [K, N, C], [N]
        out = criterion(logits, y, return_components=True)  # out.loss, out.ce, out.mimicry
        losses = criterion([net(x) for net in peers], y, per_peer=True)  # K losses
    """

    def forward(
        self,
        logits: Logits,
        target: Tensor | None,
        *,
        return_components: bool | None = None,
        per_peer: bool | None = None,
    ) -> Tensor | tuple[Tensor, ...] | MutualLossOutput:
        """The loss of `logits` [K, N, C, ...] against `target` [N, ...], as `mutual_loss`;
        `return_components` and `per_peer` override the constructor's for this call."""
        o = self.options
        return mutual_loss_with(
            logits,
            target,
            o,
            o.return_components if return_components is None else return_components,
            o.per_peer if per_peer is None else per_peer,
        )
