"""The fused linear mutual loss: K peers' output layers and their mutual loss in one chunked op.

The logits of a large vocabulary (K peers x N tokens x V classes, and as much again of gradient)
are never held whole: rows are taken a chunk at a time, each chunk's K logit blocks are formed by
matmul, the fused mutual-loss op of the device computes their loss rows and logit gradient, and
that gradient goes straight into the gradients of the hidden states, weights and biases. So the
extra memory is that of one chunk, O(K * chunk * V), plus the parameters' gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastdml.loss import backends, ops
from fastdml.loss.arguments import (
    FLOAT_DTYPES,
    MutualLossProblem,
    accumulation_dtype,
    check_target_values,
    make_problem,
)
from fastdml.loss.mutual_loss import LossModule, MutualLossOutput
from fastdml.loss.options import LossOptions
from fastdml.loss.per_peer import check_peer_inputs, per_peer_losses

Peers = Tensor | Sequence[Tensor]
Biases = Tensor | Sequence[Tensor | None] | None

# What one chunk's logits may take. Each chunk reads and writes every weight gradient once, so
# chunks of few rows are slow: on a 2-core CPU, chunks of 64 MiB were about as fast as the unfused
# path and chunks of 64 rows slower (benchmarks/linear_loss.md). A GPU has room for larger chunks.
GPU_CHUNK_BYTES = 256 << 20
CPU_CHUNK_BYTES = 64 << 20


def default_chunk_size(
    num_peers: int, num_classes: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Rows per chunk so that the chunk's K logit blocks fill GPU_CHUNK_BYTES on CUDA and
    CPU_CHUNK_BYTES elsewhere (the chunk's logit gradient takes as much again); at least one row,
    a multiple of 64 rows from 64 up (whole matmul tiles)."""
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = budget // (num_peers * num_classes * dtype.itemsize)
    return max(1, rows // 64 * 64 if rows >= 64 else rows)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


@dataclass(frozen=True)
class _Settings:
    """The call's constants: the loss options, and how the flat tensors split into peers."""

    problem: MutualLossProblem  # the whole batch's, with logits that take no memory
    # The ce_weight of the gradient's problem: the option's times the ratio of the two terms' row
    # weights (backends.term_scales), so that the mimicry's weight scales both.
    grad_ce_weight: float
    reduction: str
    backend: str
    chunk_size: int
    num_peers: int
    grad_enabled: bool
    counts: tuple[int, int, int]  # tensors given for hidden, weight, bias: 1 when stacked, else K

    def split(self, tensors: Sequence[Tensor | None]) -> list[list[Tensor | None]]:
        """Per-peer hidden, weight and bias (a stacked tensor as its K views; no bias: None)."""
        groups, start = [], 0
        for count in self.counts:
            group = tensors[start : start + count]
            start += count
            if count == 0:
                groups.append([None] * self.num_peers)
            elif count == 1:  # stacked, or its gradient (None where it needs none)
                stacked = group[0]
                groups.append(
                    [None] * self.num_peers if stacked is None else list(stacked.unbind(0))
                )
            else:
                groups.append(list(group))
        return groups


def _grad_buffers(
    settings: _Settings, tensors: Sequence[Tensor | None], needs: Sequence[bool]
) -> list[Tensor | None]:
    """Gradients for the inputs that need them: hidden rows are written chunk by chunk, weights
    accumulated in their dtype, biases in the accumulation dtype (cast by `_finished`)."""
    buffers: list[Tensor | None] = []
    hidden_count, weight_count, _ = settings.counts
    for index, (tensor, need) in enumerate(zip(tensors, needs, strict=True)):
        if not need or tensor is None:
            buffers.append(None)
        elif index < hidden_count:
            buffers.append(torch.empty_like(tensor))
        elif index < hidden_count + weight_count:
            buffers.append(torch.zeros_like(tensor))
        else:
            buffers.append(torch.zeros_like(tensor, dtype=accumulation_dtype(tensor.dtype)))
    return buffers


def _finished(
    settings: _Settings, tensors: Sequence[Tensor | None], grads: list[Tensor | None]
) -> list[Tensor | None]:
    """The gradients in their inputs' dtypes (the biases' were accumulated wider)."""
    start = sum(settings.counts[:2])
    return grads[:start] + [
        None if grad is None else grad.to(tensor.dtype)
        for tensor, grad in zip(tensors[start:], grads[start:], strict=True)
    ]


def _chunked_pass(
    settings: _Settings,
    target: Tensor,
    peer_weights: Tensor | None,
    tensors: Sequence[Tensor | None],
    grad_scale: Tensor | None,
    grads: list[Tensor | None],
) -> Tensor:
    """Loss, cross-entropy and mimicry of every peer, [3, K] summed over rows (reduction "none":
    [3, K, N]), and, where grad_scale is given, the gradient of ``sum(grad_scale * loss)``
    accumulated into `grads` (grad_scale 0-dim, or [K, N] for reduction "none")."""
    hidden, weight, bias = settings.split(tensors)
    grad_hidden, grad_weight, grad_bias = settings.split(grads)
    k, (n, _), num_classes = settings.num_peers, hidden[0].shape, weight[0].shape[0]
    dtype = hidden[0].dtype
    acc = accumulation_dtype(dtype)
    per_row = settings.reduction == "none"
    terms = hidden[0].new_zeros((3, k, n) if per_row else (3, k), dtype=acc)
    for start in range(0, n, settings.chunk_size):
        rows = slice(start, min(start + settings.chunk_size, n))
        logits = hidden[0].new_empty((k, rows.stop - start, num_classes))
        for peer in range(k):
            if bias[peer] is None:
                torch.mm(hidden[peer][rows], weight[peer].t(), out=logits[peer])
            else:
                torch.addmm(bias[peer], hidden[peer][rows], weight[peer].t(), out=logits[peer])
        problem = dataclasses.replace(
            settings.problem,
            logits=logits,
            target=target[rows],
            peer_weights=peer_weights,
            row_shape=(rows.stop - start,),
            ce_weight=settings.problem.ce_weight if grad_scale is None else settings.grad_ce_weight,
        )
        if grad_scale is None:
            chunk_terms = backends.IMPLEMENTATIONS[settings.backend](problem, "none")
        else:
            scale = grad_scale[:, rows] if grad_scale.dim() else grad_scale
            *chunk_terms, grad = backends.loss_rows_and_grad(settings.backend, problem, scale)
            for peer in range(k):
                if grad_hidden[peer] is not None:
                    torch.mm(grad[peer], weight[peer], out=grad_hidden[peer][rows])
                if grad_weight[peer] is not None:
                    grad_weight[peer].addmm_(grad[peer].t(), hidden[peer][rows])
                if grad_bias[peer] is not None:
                    grad_bias[peer].add_(grad[peer].sum(0, dtype=acc))
        chunk_terms = torch.stack(chunk_terms)
        if per_row:
            terms[:, :, rows] = chunk_terms
        else:
            terms += chunk_terms.sum(-1)
    return terms


class _FusedLinearMutualLoss(torch.autograd.Function):
    """Forward: the loss and, for reductions "mean" and "sum", every gradient, scaled by the
    reduction's row weights; backward: those gradients times the upstream gradient. Where the
    forward kept none (reduction "none", float16, a second backward through a retained graph) the
    backward runs the chunks again with the upstream gradient folded into the op's scale."""

    @staticmethod
    def forward(ctx, settings, target, peer_weights, ce_scale, mimicry_scale, *tensors):
        needs = ctx.needs_input_grad[5:]
        in_forward = (
            settings.grad_enabled
            and any(needs)
            and settings.reduction != "none"
            and tensors[0].dtype not in ops.RECOMPUTE_GRAD_DTYPES
        )
        grads = _grad_buffers(settings, tensors, needs) if in_forward else [None] * len(tensors)
        terms = _chunked_pass(
            settings, target, peer_weights, tensors, mimicry_scale if in_forward else None, grads
        )
        ctx.settings = settings
        ctx.grads = _finished(settings, tensors, grads) if in_forward else None
        ctx.save_for_backward(target, peer_weights, mimicry_scale, *tensors)
        ctx.set_materialize_grads(False)
        loss, ce, mimicry = terms
        if settings.reduction != "none":
            problem = settings.problem
            ce_scale = mimicry_scale if ce_scale is None else ce_scale
            ce, mimicry = ce * ce_scale, mimicry * mimicry_scale
            factor = problem.alpha * problem.temperature**2
            loss = (problem.ce_weight * ce + factor * mimicry).sum()
        ctx.mark_non_differentiable(ce, mimicry)
        return loss, ce, mimicry

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_mimicry):
        target, peer_weights, mimicry_scale, *tensors = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * (5 + len(tensors))
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            settings = ctx.settings
            needs = ctx.needs_input_grad[5:]
            grads = _grad_buffers(settings, tensors, needs)
            scale = grad_loss if settings.reduction == "none" else grad_loss * mimicry_scale
            _chunked_pass(settings, target, peer_weights, tensors, scale, grads)
            grads = _finished(settings, tensors, grads)
        elif torch.compiler.is_compiling() or grad_loss.device.type != "cpu" or grad_loss != 1:
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss)
        return (None, None, None, None, None, *grads)


def _peer_list(name: str, value: Peers, dims: str) -> list[Tensor]:
    """The K per-peer tensors of an argument, a list or a stacked tensor."""
    per_peer = dims.count(",") + 1
    if isinstance(value, Tensor):
        if value.dim() != per_peer + 1:
            raise ValueError(
                f"{name} must be a list of K tensors [{dims}] or one stacked tensor [K, {dims}], "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        return list(value.unbind(0))
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of K tensors [{dims}] or a tensor [K, {dims}], "
            f"got {type(value).__name__}"
        )
    for k, peer in enumerate(value):
        if not isinstance(peer, Tensor):
            raise TypeError(f"{name}[{k}] must be a Tensor, got {type(peer).__name__}")
        if peer.dim() != per_peer:
            raise ValueError(f"{name}[{k}] must have shape [{dims}], got shape {tuple(peer.shape)}")
    return list(value)


def _peer_biases(bias: Biases, weights: list[Tensor]) -> list[Tensor | None]:
    """The K per-peer biases [V] (or None) of a list, or of a stacked tensor [K, V]."""
    if isinstance(bias, Tensor):
        if bias.dim() != 2:
            raise ValueError(
                "bias must be None, a list of K tensors [V] or a stacked tensor [K, V], "
                f"got a tensor of shape {tuple(bias.shape)}"
            )
        biases = list(bias.unbind(0))
    elif isinstance(bias, (list, tuple)):
        biases = list(bias)
    else:
        raise TypeError(
            "bias must be None, a list of K tensors [V] or a tensor [K, V], "
            f"got {type(bias).__name__}"
        )
    if len(biases) != len(weights):
        raise ValueError(f"bias must hold K = {len(weights)} peers, got {len(biases)}")
    num_classes = weights[0].shape[0]
    for k, peer_bias in enumerate(biases):
        if peer_bias is None:
            continue
        if not isinstance(peer_bias, Tensor):
            raise TypeError(f"bias[{k}] must be a Tensor or None, got {type(peer_bias).__name__}")
        if tuple(peer_bias.shape) != (num_classes,):
            raise ValueError(
                f"bias[{k}] must have shape [V] = [{num_classes}], got {tuple(peer_bias.shape)}"
            )
    return biases


def _check_layers(
    hidden: Peers, weight: Peers, bias: Biases, autocast: bool
) -> tuple[int, int, int]:
    """Shapes, dtypes and devices of the layers (dtypes may differ under autocast, which casts
    them); returns (K, N, V)."""
    hiddens = _peer_list("hidden", hidden, "N, H")
    weights = _peer_list("weight", weight, "V, H")
    if len(hiddens) != len(weights):
        raise ValueError(
            f"hidden and weight must hold the same number of peers K, got {len(hiddens)} "
            f"hidden states and {len(weights)} weights"
        )
    if not hiddens:
        raise ValueError("mutual learning needs at least 2 peers, got 0")
    named = [(f"hidden[{k}]", h) for k, h in enumerate(hiddens)]
    named += [(f"weight[{k}]", w) for k, w in enumerate(weights)]
    if bias is not None:
        biases = _peer_biases(bias, weights)
        named += [(f"bias[{k}]", b) for k, b in enumerate(biases) if b is not None]
    first = hiddens[0]
    for name, tensor in named:
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be floating point (one of {[str(d) for d in FLOAT_DTYPES]}), "
                f"got {tensor.dtype}"
            )
        if tensor.device != first.device:
            raise ValueError(
                f"every hidden state, weight and bias must be on one device: hidden[0] is on "
                f"{first.device}, {name} on {tensor.device}"
            )
        if tensor.dtype != first.dtype and not autocast:
            raise ValueError(
                f"every hidden state, weight and bias must share one dtype: hidden[0] has "
                f"{first.dtype}, {name} has {tensor.dtype}; cast them to one dtype, or call "
                "the loss under torch.autocast, which runs the matmuls in its dtype as F.linear "
                "does"
            )
    for k, (h, w) in enumerate(zip(hiddens, weights, strict=True)):
        if h.shape[0] != first.shape[0]:
            raise ValueError(
                f"every peer's hidden states must have the same N rows: hidden[0] has "
                f"{first.shape[0]}, hidden[{k}] has {h.shape[0]}"
            )
        if w.shape[0] != weights[0].shape[0]:
            raise ValueError(
                f"every peer's weight must have the same V classes: weight[0] has "
                f"{weights[0].shape[0]}, weight[{k}] has {w.shape[0]}"
            )
        if h.shape[1] != w.shape[1]:
            raise ValueError(
                f"peer {k}: hidden [N, H] has H = {h.shape[1]}, but its weight [V, H] has "
                f"H = {w.shape[1]}"
            )
    return len(hiddens), first.shape[0], weights[0].shape[0]


def _cast(value: Peers | Biases, dtype: torch.dtype) -> Peers | Biases:
    """The tensors of an argument in `dtype` (autograd casts their gradients back)."""
    if value is None or isinstance(value, Tensor):
        return None if value is None else value.to(dtype)
    return [None if tensor is None else tensor.to(dtype) for tensor in value]


def _flat(value: Peers | Biases) -> tuple[list[Tensor | None], int]:
    """The tensors an argument passes to the autograd function, and how many."""
    if value is None:
        return [], 0
    items = [value] if isinstance(value, Tensor) else list(value)
    return items, len(items)


def _checked_fused_linear_mutual_loss(
    hidden: Peers,
    weight: Peers,
    target: Tensor | None,
    bias: Biases,
    chunk_size: int | None,
    options: LossOptions,
    return_components: bool,
    per_peer: bool = False,
) -> Tensor | tuple[Tensor, ...] | MutualLossOutput:
    """`fused_linear_mutual_loss` once its options are checked."""
    if per_peer:
        return _per_peer_loss(hidden, weight, target, bias, chunk_size, options, return_components)
    first = hidden[0]
    device_type = first.device.type if isinstance(first, Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    num_peers, rows, num_classes = _check_layers(hidden, weight, bias, autocast)
    if autocast:  # as F.linear: the matmuls in autocast's dtype, each gradient in its tensor's
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (_cast(value, dtype) for value in (hidden, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return _checked_fused_linear_mutual_loss(
                hidden, weight, target, bias, chunk_size, options, return_components
            )
    first = hidden[0]
    _check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_peers, num_classes, first.dtype, first.device)
    # The whole batch's problem, with logits that take no memory: it checks the target and the
    # peer weights once, as mutual_loss would.
    problem = make_problem(
        first.new_zeros(()).expand(num_peers, rows, num_classes), target, options
    )
    name = backends.select(
        options.backend, first.device, num_peers, num_classes, options.uses_family
    )
    # Checked here for the whole batch even where the op checks its own rows (the CPU op), so a
    # bad target fails before any chunk's matmuls, and names its row in the batch.
    if name in backends.RAISES_ON_BAD_TARGETS or backends.needs_target_check(name):
        check_target_values(problem)
    reduction = options.reduction
    ce_scale, mimicry_scale = backends.term_scales(problem, reduction)
    # Differ only for "mean" with mimic_unlabeled, whose ratio is read here (on CUDA, a sync).
    # (A tensor is passed once only: autograd.Function under torch.compile takes no duplicates.)
    ratio = 1.0
    if ce_scale is mimicry_scale:
        ce_scale = None
    else:
        ratio = float(ce_scale / mimicry_scale)
    flat_hidden, hidden_count = _flat(hidden)
    flat_weight, weight_count = _flat(weight)
    flat_bias, bias_count = _flat(bias)
    settings = _Settings(
        problem=problem,
        grad_ce_weight=problem.ce_weight * ratio,
        reduction=reduction,
        backend=name,
        chunk_size=chunk_size,
        num_peers=num_peers,
        grad_enabled=torch.is_grad_enabled(),
        counts=(hidden_count, weight_count, bias_count),
    )
    loss, ce, mimicry = _FusedLinearMutualLoss.apply(
        settings,
        problem.target,
        problem.peer_weights,
        ce_scale,
        mimicry_scale,
        *flat_hidden,
        *flat_weight,
        *flat_bias,
    )
    if not return_components:
        return loss
    return MutualLossOutput(loss, ce, mimicry)


def _per_peer_loss(
    hidden: Peers,
    weight: Peers,
    target: Tensor | None,
    bias: Biases,
    chunk_size: int | None,
    options: LossOptions,
    return_components: bool,
) -> tuple[Tensor, ...] | MutualLossOutput:
    """Each peer's loss, backpropagating into its own hidden states, weight and bias only."""
    if options.reduction == "none":
        raise ValueError(
            "per_peer=True needs reduction 'mean' or 'sum' here: the gradients of the weights are "
            "computed in the forward, where a per-row upstream gradient is not known yet"
        )
    hiddens = check_peer_inputs("hidden", hidden)
    weights = check_peer_inputs("weight", weight)
    if hiddens and hiddens[0].dtype == torch.float16:
        raise ValueError(
            "per_peer=True takes float32, bfloat16 or float64 layers here, got float16: its "
            "gradients are computed at an upstream gradient of 1, where float16 would flush a "
            "loss-scaled gradient to zero"
        )
    if isinstance(bias, Tensor):
        biases = check_peer_inputs("bias", bias)
    else:
        biases = [None] * len(weights) if bias is None else list(bias)
    given = [k for k, peer_bias in enumerate(biases) if peer_bias is not None]
    inputs = [*hiddens, *weights, *(biases[k] for k in given)]
    peer_of = [*range(len(hiddens)), *range(len(weights)), *given]
    out: list[MutualLossOutput] = []

    def loss_of(tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
        h, w = tensors[: len(hiddens)], tensors[len(hiddens) : len(hiddens) + len(weights)]
        b = list(biases)
        for k, peer_bias in zip(given, tensors[len(h) + len(w) :], strict=True):
            b[k] = peer_bias
        out.append(
            _checked_fused_linear_mutual_loss(
                h, w, target, None if bias is None else b, chunk_size, options, True
            )
        )
        loss, ce, mimicry = out[-1]
        return loss, options.ce_weight * ce + options.alpha * options.temperature**2 * mimicry

    losses = per_peer_losses(inputs, peer_of, loss_of, lambda tensor: tensor.dtype)
    if not return_components:
        return losses
    return MutualLossOutput(losses, out[-1].ce, out[-1].mimicry)


def fused_linear_mutual_loss(
    hidden: Peers,
    weight: Peers,
    target: Tensor | None,
    bias: Biases = None,
    *,
    chunk_size: int | None = None,
    **options: Any,
) -> Tensor | tuple[Tensor, ...] | MutualLossOutput:
    """`mutual_loss` of the logits ``h_k @ W_k.T + b_k``, without ever holding them whole.

    Equal, value and gradients, to ``mutual_loss([h @ w.T + b for ...], target, **options)``,
    to rounding; the options are those of `mutual_loss`. The gradients of the hidden states,
    weights and biases are computed chunk by chunk in the forward (reductions "mean" and "sum")
    and scaled by the upstream gradient in the backward. Reduction "none" and float16 compute
    them in the backward instead, with the upstream gradient folded in before the rounding to the
    logits' dtype, as `mutual_loss` does for float16: that runs the chunks' matmuls once more.

    A peer whose hidden states, weight and bias need no gradient (a frozen teacher) costs its
    logits' matmul per chunk and nothing in the backward. The matmuls run in the inputs' dtype,
    the loss in float32 (float64 for float64); weight gradients are accumulated over the chunks
    in the weights' dtype, bias gradients in float32.

    Args:
        hidden: K tensors [N, H_k] (the widths may differ), or one stacked tensor [K, N, H].
        weight: K tensors [V, H_k] (each peer's output layer), or one tensor [K, V, H].
        target: int64 class indices [N], or None for a mimicry-only loss (``ce_weight=0``).
        bias: None, K tensors [V] (or None for a peer without one), or one tensor [K, V].
        chunk_size: rows per chunk; the default, `default_chunk_size`, keeps one chunk's logits
            near 256 MiB on a GPU and 64 MiB elsewhere. The extra memory is about twice that
            (the chunk's logit gradient) plus the gradients of the inputs.
        options: the fields of `LossOptions`, as for `mutual_loss`.

    Returns:
        As `mutual_loss`: the loss (0-dim, or [K, N] for reduction "none"); with
        ``per_peer=True`` (reductions "mean" and "sum"; not float16) each peer's, a tuple of K
        0-dim tensors; with ``return_components=True`` a `MutualLossOutput`.
    """
    options = LossOptions(**options)
    return _checked_fused_linear_mutual_loss(
        hidden,
        weight,
        target,
        bias,
        chunk_size,
        options,
        options.return_components,
        options.per_peer,
    )


class FusedLinearMutualLoss(LossModule):
    """`fused_linear_mutual_loss` as a module:
    ``FusedLinearMutualLoss(**options)(hidden, weight, target, bias=None)``.

    Takes the keyword options of `fused_linear_mutual_loss`; they are checked here, at
    construction.

    Example::

        criterion = FusedLinearMutualLoss(temperature=2.0)
        hidden = torch.stack([body(x) for body in bodies])  # [K, N, H]
        loss = criterion(hidden, torch.stack([head.weight for head in heads]), y)  # [K, V, H]
    """

    def __init__(self, *, chunk_size: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: Peers,
        weight: Peers,
        target: Tensor | None,
        bias: Biases = None,
        *,
        return_components: bool | None = None,
        per_peer: bool | None = None,
    ) -> Tensor | tuple[Tensor, ...] | MutualLossOutput:
        """As `fused_linear_mutual_loss`; `return_components` and `per_peer` override the
        constructor's."""
        o = self.options
        return _checked_fused_linear_mutual_loss(
            hidden,
            weight,
            target,
            bias,
            self.chunk_size,
            o,
            o.return_components if return_components is None else return_components,
            o.per_peer if per_peer is None else per_peer,
        )
