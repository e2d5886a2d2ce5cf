"""K peers of one architecture as one batched module: one forward and one backward for all.

`stack_peers(peers)` copies K models of one architecture into one module whose parameters and
buffers are stacked [K, ...]: a linear layer becomes one batched matrix product, a convolution one
grouped convolution over K times the channels, a batch norm one batch norm over K times the
channels (so each peer keeps its own running statistics). The architecture's own forward runs on
these layers unchanged, because they agree on where each peer's part of an activation lies:

- the input batch is shared: every peer sees the same one;
- after a convolution or batch norm, [N, K * C, ...]: peer k's channels are the k-th block;
- after a linear layer, [K, N, F]: so the logits come out [K, N, C], as the fused loss takes them.

Elementwise layers (ReLU, dropout) act on the stacked activations, so each peer draws its own
dropout mask. The peers' own modules are then pointed at their slices of the stacked tensors:
they stay current, for saving or running one peer alone, without a copy.

Stacked are `MLP`, `CNN1d`, `CifarResNet`, `WideResNet` and `MobileNet` of `fastdml.models` (any
other module type is refused, since its forward may not keep the layouts above).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdml import models

# Modules whose forward uses only the stacked layers and layout-keeping operations.
ARCHITECTURES = (
    models.MLP,
    models.CNN1d,
    models.BasicBlock,
    models.CifarResNet,
    models.WideBlock,
    models.WideResNet,
    models.MobileNet,
    nn.Sequential,
    nn.ModuleList,
)
ELEMENTWISE = (nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten)


def _stack(tensors: Sequence[Tensor | None]) -> Tensor | None:
    return None if tensors[0] is None else torch.stack([t.detach() for t in tensors])


class StackedLinear(nn.Module):
    """K linear layers as one batched matrix product; returns [K, N, out_features].

    Takes the shared input [N, in_features], a convolution's [N, K * in_features] or a linear
    layer's [K, N, in_features]."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.peers = len(layers)
        self.in_features, self.out_features = layers[0].in_features, layers[0].out_features
        self.weight = nn.Parameter(_stack([m.weight for m in layers]))
        self.bias = (
            nn.Parameter(_stack([m.bias for m in layers])) if layers[0].bias is not None else None
        )

    def forward(self, x: Tensor) -> Tensor:
        k, width = self.peers, self.in_features
        if x.dim() == 2 and x.shape[1] == width:
            x = x.expand(k, *x.shape)
        elif x.dim() == 2 and x.shape[1] == k * width:
            x = x.view(x.shape[0], k, width).transpose(0, 1)
        elif not (x.dim() == 3 and x.shape[0] == k and x.shape[2] == width):
            raise ValueError(
                f"a stacked linear layer of {k} peers takes [N, {width}], [N, {k * width}] or "
                f"[{k}, N, {width}], got {list(x.shape)}"
            )
        return _BatchedLinear.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.peers} x ({self.in_features}, {self.out_features})"


class _BatchedLinear(torch.autograd.Function):
    """x @ weight^T + bias per peer, whose weight gradient comes out in the weight's own layout
    (autograd's, through the transpose, would be copied into it on every step). Its forward
    takes ctx itself: a separate setup_context costs twice the dispatch per call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight.to(grad.dtype)) if wants_x else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x.to(grad.dtype)) if wants_weight else None
        return grad_x, grad_weight, grad.sum(1) if wants_bias else None


class StackedConv(nn.Module):
    """K 1-D or 2-D convolutions as one grouped convolution; returns [N, K * out_channels, ...].

    Takes the shared input [N, in_channels, ...] (one convolution with K times the filters) or
    [N, K * in_channels, ...]."""

    def __init__(self, convs: Sequence[nn.Conv1d | nn.Conv2d]) -> None:
        super().__init__()
        conv = convs[0]
        if conv.padding_mode != "zeros":
            raise ValueError(f"stacked convolutions pad with zeros, got {conv.padding_mode!r}")
        self.peers, self.in_channels, self.groups = len(convs), conv.in_channels, conv.groups
        self.function = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        self.options = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
        self.weight = nn.Parameter(_stack([m.weight for m in convs]))
        self.bias = nn.Parameter(_stack([m.bias for m in convs])) if conv.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        k, channels = self.peers, self.in_channels
        weight = self.weight.flatten(0, 1)
        bias = None if self.bias is None else self.bias.flatten()
        groups = k * self.groups
        if x.shape[1] == channels and self.groups == 1:  # the shared input: no copy of it
            groups = 1
        elif x.shape[1] == channels:
            x = x.repeat(1, k, *[1] * (x.dim() - 2))
        elif x.shape[1] != k * channels:
            raise ValueError(
                f"a stacked convolution of {k} peers takes {channels} or {k * channels} input "
                f"channels, got {list(x.shape)}"
            )
        return self.function(x, weight, bias, groups=groups, **self.options)

    def extra_repr(self) -> str:
        return f"{self.peers} x {tuple(self.weight.shape[1:])}, {self.options}"


class StackedBatchNorm(nn.Module):
    """K batch norms as one over [N, K * C, ...]: each peer's batch and running statistics."""

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        norm = norms[0]
        if norm.momentum is None:
            raise ValueError(
                "stacked batch norms take a momentum; the cumulative average is not stacked"
            )
        self.peers, self.num_features = len(norms), norm.num_features
        self.eps, self.momentum = norm.eps, norm.momentum
        self.weight = nn.Parameter(_stack([m.weight for m in norms])) if norm.affine else None
        self.bias = nn.Parameter(_stack([m.bias for m in norms])) if norm.affine else None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, _stack([getattr(m, name) for m in norms]))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.peers * self.num_features:
            raise ValueError(
                f"a stacked batch norm of {self.peers} peers takes [N, "
                f"{self.peers * self.num_features}, ...], got {list(x.shape)}"
            )
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x,
            _flat(self.running_mean),
            _flat(self.running_var),
            _flat(self.weight),
            _flat(self.bias),
            self.training or self.running_mean is None,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.peers} x {self.num_features}, eps={self.eps}, momentum={self.momentum}"


def _flat(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.view(-1)


LAYERS = {
    nn.Linear: StackedLinear,
    nn.Conv1d: StackedConv,
    nn.Conv2d: StackedConv,
    nn.BatchNorm1d: StackedBatchNorm,
    nn.BatchNorm2d: StackedBatchNorm,
}


def stack_peers(peers: Sequence[nn.Module]) -> nn.Module:
    """One module computing K peers of one architecture at once; logits [K, N, C].

    Its parameters and buffers are the peers' own, stacked [K, ...] under the same names (so
    peer k's ``state_dict`` is the stacked one's slice k); the peers' modules then hold views of
    their slices (see `share_slices`).

    Example::

        stacked = stack_peers([build_model("mlp", (40,), 10) for _ in range(4)])
        logits = stacked(x)  # x [N, 40] -> [4, N, 10]
    """
    peers = list(peers)
    if not peers or not all(isinstance(p, nn.Module) for p in peers):
        raise TypeError("peers must be a non-empty sequence of nn.Module")
    if len({id(p) for p in peers}) != len(peers):
        raise ValueError("each peer must be a distinct module (the same one was given twice)")
    layout = _architecture(peers[0])
    for k, peer in enumerate(peers[1:], 1):
        if _architecture(peer) != layout:
            raise ValueError(
                f"stacked peers must share one architecture: peer {k} ({type(peer).__name__}) "
                f"differs from peer 0 ({type(peers[0]).__name__}); stack only a cohort of one "
                "architecture, or train it unstacked"
            )
    devices = {t.device for p in peers for t in (*p.parameters(), *p.buffers())}
    if len(devices) > 1:
        raise ValueError(f"stacked peers must be on one device, got {sorted(map(str, devices))}")
    stacked = copy.deepcopy(peers[0])
    for name, module in peers[0].named_modules():
        if type(module) in LAYERS:
            layer = LAYERS[type(module)]([p.get_submodule(name) for p in peers])
            stacked.set_submodule(name, layer)
    stacked.train(peers[0].training)
    share_slices(stacked, peers)
    return stacked


def _architecture(module: nn.Module) -> list[tuple[str, type, str]]:
    """What must agree between peers to be stacked; refuses a module that cannot be."""
    for name, m in module.named_modules():
        if type(m) not in (*LAYERS, *ARCHITECTURES, *ELEMENTWISE):
            known = ", ".join(t.__name__ for t in ARCHITECTURES)
            layers = ", ".join(t.__name__ for t in (*LAYERS, *ELEMENTWISE))
            raise TypeError(
                f"cannot stack {type(m).__name__} (at {name or 'the top'} of a "
                f"{type(module).__name__}): stacked are {known} built of {layers}"
            )
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            raise TypeError(f"cannot stack a Flatten of other dimensions than 1..-1 (at {name})")
    shapes = [(n, t.shape, t.dtype) for n, t in module.state_dict().items()]
    return [(n, type(m), m.extra_repr()) for n, m in module.named_modules()] + [shapes]


def share_slices(stacked: nn.Module, peers: Sequence[nn.Module]) -> None:
    """Points each peer's parameters and buffers at its slice of `stacked`'s: the stacked model
    trains, and each peer module always holds its current weights."""
    tensors = {**dict(stacked.named_parameters()), **dict(stacked.named_buffers())}
    for k, peer in enumerate(peers):
        for name, tensor in (*peer.named_parameters(), *peer.named_buffers()):
            tensor.data = tensors[name].data[k]
