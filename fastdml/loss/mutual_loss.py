"""The public mutual loss: `mutual_loss` and its module form `MutualLoss`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastdml.loss import backends
from fastdml.loss.arguments import (
    Logits,
    PeerWeights,
    check_options,
    check_peer_weights,
    check_target_values,
    make_problem,
)


class MutualLossOutput(NamedTuple):
    """The loss and, for logging, each peer's two terms reduced like the loss (detached).

    `ce` and `mimicry` are [K] for reduction "mean" and "sum", [K, N, d1, ...] for "none";
    `mimicry` is the KL term M_k itself, before the alpha * T^2 weight.
    """

    loss: Tensor
    ce: Tensor
    mimicry: Tensor


def mutual_loss(
    logits: Logits,
    target: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    mode: str = "pairwise",
    peer_weights: PeerWeights | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Tensor | MutualLossOutput:
    """The Deep Mutual Learning loss of a cohort of K peers.

    For peer k and row n: ``l_kn = CE(z_kn, y_n) + alpha * T**2 * M_kn``, with CE exactly
    ``F.cross_entropy(..., label_smoothing=label_smoothing)`` and, for ``q = softmax(z / T)``:

    - ``mode="pairwise"`` (DML): ``M_k = 1/(K-1) * sum_{j != k} KL(q_j || q_k)``;
    - ``mode="ensemble"`` (DML_e): ``M_k = KL(mean_{j != k} q_j || q_k)``;
    - ``mode="ensemble_logits"``: ``M_k = KL(softmax(mean_{j != k} z_j / T) || q_k)``;
    - ``peer_weights=W`` (K x K, overrides mode): ``M_k = sum_j W[k, j] * KL(q_j || q_k)``.

    The mimicry targets are constants, so ``loss.backward()`` sends each peer exactly its own DML
    gradient. Rows whose target is ``ignore_index`` contribute nothing.

    Args:
        logits: [K, N, C] (or [K, N, C, d1, ...]), or a list/tuple of K tensors [N, C] (or
            [N, C, d1, ...]); float32, float64, float16 or bfloat16.
        target: int64 class indices [N] (or [N, d1, ...]).
        reduction: "mean" sums over peers each peer's mean over non-ignored rows; "sum" sums
            over peers and rows; "none" returns [K, N] (or [K, N, d1, ...]).
        return_components: also return each peer's cross-entropy and mimicry (see
            `MutualLossOutput`).
        backend: "auto" (the fastest available for the tensors' device), "torch" (pure
            PyTorch), "cpp" (the fused C++ CPU op), "triton" or "cuda" (the fused GPU ops).
            The GPU ops do not range-check targets on the host (that would synchronize every
            call): a row whose target is outside [0, C) and not ignore_index gets a NaN loss
            and gradient.
    """
    check_options(
        temperature=temperature,
        alpha=alpha,
        mode=mode,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
    )
    return _checked_mutual_loss(
        logits,
        target,
        temperature,
        alpha,
        mode,
        peer_weights,
        label_smoothing,
        ignore_index,
        reduction,
        return_components,
        backend,
    )


def _checked_mutual_loss(
    logits: Logits,
    target: Tensor,
    temperature: float,
    alpha: float,
    mode: str,
    peer_weights: PeerWeights | None,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    return_components: bool,
    backend: str,
) -> Tensor | MutualLossOutput:
    """`mutual_loss` once its options are checked: what a call costs beyond the kernels."""
    problem = make_problem(
        logits,
        target,
        temperature=temperature,
        alpha=alpha,
        mode=mode,
        peer_weights=peer_weights,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )
    device = problem.logits.device
    name = backends.select(backend, device, problem.num_peers, problem.logits.shape[2])
    if backends.needs_target_check(name, device):
        check_target_values(problem)
    loss, ce, mimicry = backends.IMPLEMENTATIONS[name](problem, reduction)
    if reduction == "none":
        shape = (problem.num_peers, *problem.row_shape)
        loss, ce, mimicry = (terms.view(shape) for terms in (loss, ce, mimicry))
    if not return_components:
        return loss
    return MutualLossOutput(loss, ce, mimicry)


class LossOptions(nn.Module):
    """The keyword options of `mutual_loss`, checked once at construction and kept on a module;
    the base of the loss modules."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 1.0,
        mode: str = "pairwise",
        peer_weights: PeerWeights | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        return_components: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_options(
            temperature=temperature,
            alpha=alpha,
            mode=mode,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )
        self.temperature = temperature
        self.alpha = alpha
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.return_components = return_components
        self.backend = backend
        weights = None
        if peer_weights is not None:
            weights = torch.as_tensor(peer_weights, dtype=torch.float64).detach()
            check_peer_weights(weights, weights.shape[0] if weights.dim() else 0)
        self.register_buffer("peer_weights", weights, persistent=False)

    def extra_repr(self) -> str:
        mode = "peer_weights" if self.peer_weights is not None else repr(self.mode)
        return (
            f"mode={mode}, temperature={self.temperature}, alpha={self.alpha}, "
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )


class MutualLoss(LossOptions):
    """`mutual_loss` as a module: ``MutualLoss(**options)(logits, target)``.

    Takes the keyword options of `mutual_loss`; they are checked here, at construction.
    """

    def forward(self, logits: Logits, target: Tensor) -> Tensor | MutualLossOutput:
        return _checked_mutual_loss(
            logits,
            target,
            self.temperature,
            self.alpha,
            self.mode,
            self.peer_weights,
            self.label_smoothing,
            self.ignore_index,
            self.reduction,
            self.return_components,
            self.backend,
        )
