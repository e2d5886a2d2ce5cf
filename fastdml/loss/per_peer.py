"""Each peer's loss as a graph of its own, for training loops that step one peer at a time.

One loss of the whole cohort cannot serve such a loop: its graph joins every peer's, so the first
peer's backward runs the others' backwards too (with zero gradients) and frees their graphs, and
the second peer's backward fails. Here one fused call computes every peer's loss and gradient,
with the peers' logits detached, and each peer's loss becomes an autograd node whose only input is
that peer's own tensor and whose backward returns the gradient already computed, times the
upstream gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class _PeerLoss(torch.autograd.Function):
    """One peer's loss; its backward sends the precomputed gradients into that peer's inputs."""

    @staticmethod
    def forward(ctx, loss: Tensor, grads: tuple[Tensor | None, ...], *inputs: Tensor) -> Tensor:
        ctx.save_for_backward(*(grad if grad is not None else loss.new_empty(0) for grad in grads))
        ctx.has_grad = [grad is not None for grad in grads]
        ctx.dtypes = [tensor.dtype for tensor in inputs]
        return loss.clone()

    @staticmethod
    def backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:
        grads = []
        for grad, has_grad, dtype in zip(ctx.saved_tensors, ctx.has_grad, ctx.dtypes, strict=True):
            if not has_grad:
                grads.append(None)
                continue
            # A row's upstream gradient ([N, d1, ...], reduction "none") scales its classes.
            scale = upstream if upstream.dim() == 0 else upstream.unsqueeze(1)
            grads.append((grad * scale).to(dtype))
        return None, None, *grads


def check_peer_inputs(name: str, value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The K per-peer tensors of `value`, which must not join the peers' graphs: a list of K
    tensors, or a stacked tensor only where it has no graph of its own (a leaf)."""
    if isinstance(value, Tensor):
        if value.grad_fn is not None:
            raise ValueError(
                f"per_peer=True takes {name} as a list of K tensors, one per peer: a stacked "
                f"tensor made by {type(value.grad_fn).__name__} joins the peers' graphs, so one "
                "peer's backward would run, and free, every other peer's graph"
            )
        return list(value.unbind(0))
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of K tensors, one per peer, got {type(value).__name__}"
        )
    for k, peer in enumerate(value):
        if not isinstance(peer, Tensor):
            raise TypeError(f"{name}[{k}] must be a Tensor, got {type(peer).__name__}")
    return list(value)


def per_peer_losses(
    inputs: list[Tensor],
    peer_of: Sequence[int],
    loss_of: Callable[[list[Tensor]], tuple[Tensor, Tensor]],
    grad_dtype: Callable[[Tensor], torch.dtype],
) -> tuple[Tensor, ...]:
    """Each peer's loss, as K tensors that backpropagate independently.

    inputs: every differentiable tensor of the call; peer_of[i]: the peer that inputs[i] belongs
    to. loss_of(inputs) -> (the cohort's loss, each peer's loss stacked [K, ...]), computed from
    the inputs given. grad_dtype(input): the dtype its gradient is computed in (wider than the
    input's where a gradient computed at an upstream gradient of 1 would lose digits).
    """
    needs = [torch.is_grad_enabled() and tensor.requires_grad for tensor in inputs]
    if not any(needs):
        return tuple(loss_of(inputs)[1].unbind(0))
    detached = [
        tensor.detach().to(grad_dtype(tensor)).requires_grad_(need)
        for tensor, need in zip(inputs, needs, strict=True)
    ]
    with torch.enable_grad():
        total, losses = loss_of(detached)
        wanted = [tensor for tensor, need in zip(detached, needs, strict=True) if need]
        computed = iter(torch.autograd.grad(total, wanted, torch.ones_like(total)))
    grads = [next(computed) if need else None for need in needs]
    peers = []
    for k, loss in enumerate(losses.detach().unbind(0)):
        mine = [i for i, peer in enumerate(peer_of) if peer == k]
        peers.append(
            _PeerLoss.apply(loss, tuple(grads[i] for i in mine), *(inputs[i] for i in mine))
        )
    return tuple(peers)
