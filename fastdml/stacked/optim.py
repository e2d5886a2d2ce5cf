"""One optimizer step for K peers whose parameters are stacked [K, ...], each peer with its own
hyper-parameters.

`StackedOptimizer` applies torch's SGD, Adam or AdamW update rules to the stacked tensors: with
torch's fused kernels when the stepped peers share every option (one pass over each tensor), else
with multi-tensor (foreach) operations. Its param groups are the peers' (group k holds peer k's lr,
momentum, weight decay, ..., as `make_optimizer`'s group k would, so a learning-rate scheduler
sets them the same way); in the step, a hyper-parameter the peers share is a number and one that
differs a [K, 1, ...] tensor. Its state_dict is the one torch's optimizer keeps over the K
separate peers, so stacked and unstacked cohorts read each other's checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fastdml.cohort.optim import DEFAULT_OPTIONS, OPTIMIZERS

# Options of torch's that the stacked step does not implement, and their neutral values.
UNSUPPORTED = {"maximize": False, "amsgrad": False, "differentiable": False}
Hyper = float | Tensor  # one value for every peer, or [K] values
_FUSED_DEVICES = ("cpu", "cuda")


class StackedOptimizer(Optimizer):
    """SGD, Adam or AdamW over the stacked [K, ...] parameters of `model`, per-peer options.

    Args:
        model: a module whose parameters all have the K peers first (`fastdml.stacked.layers`).
        optimizer: "sgd", "adam" or "adamw", with `make_optimizer`'s defaults.
        options: options shared by the peers (torch's names: lr, momentum, dampening, nesterov,
            weight_decay; betas, eps).
        peer_options: one mapping per peer of its own options.

    Every option torch's SGD, Adam and AdamW take may differ between peers, except maximize,
    amsgrad and differentiable, which are refused when set; foreach, fused and capturable are
    kept in the groups (for an unstacked cohort that reads the state) and change nothing here.
    The step adds the weight decay (and SGD's momentum) into the gradients in place, to save
    an allocation per tensor: they are spent once it is taken.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: str,
        *,
        options: Mapping[str, Any] | None = None,
        peer_options: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if not isinstance(optimizer, str):
            raise TypeError(
                f"a stacked cohort steps its stacked parameters with its own "
                f"{', '.join(OPTIMIZERS)}; it cannot take an optimizer factory "
                f"({getattr(optimizer, '__name__', type(optimizer).__name__)}): train the "
                "cohort unstacked for another optimizer"
            )
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the stacked model has no trainable parameters")
        peers = params[0].shape[0]
        if any(p.dim() == 0 or p.shape[0] != peers for p in params):
            raise ValueError(f"stacked parameters must all have the {peers} peers first")
        if peer_options is not None and len(peer_options) != peers:
            raise ValueError(
                f"peer_options must have one mapping per peer ({peers}), got {len(peer_options)}"
            )
        shared = {**DEFAULT_OPTIONS[optimizer], **(options or {})}
        if not shared.get("fused"):
            shared.setdefault("foreach", True)  # as make_optimizer's groups
        groups = []
        for k in range(peers):
            group = _torch_group(optimizer, {**shared, **(peer_options[k] if peer_options else {})})
            groups.append({**group, "peer": k})
        super().__init__(params, {})
        self.kind = optimizer
        self.params = params
        self.peers = peers
        self.param_groups = groups
        self.steps = [0] * peers  # steps taken by each peer

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, peer: int | None = None) -> Any:
        """Steps every peer, or only peer `peer` (its slices; the other peers and their state
        stay as they are)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = range(self.peers) if peer is None else range(peer, peer + 1)
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return loss
        names = self._buffers()
        for p in params:
            if not self.state[p]:
                self.state[p] = {name: torch.zeros_like(p) for name in names}

        def part(tensor: Tensor) -> Tensor:
            return tensor if peer is None else tensor[peer : peer + 1]

        grads = [part(p.grad) for p in params]
        state = {name: [part(self.state[p][name]) for p in params] for name in names}
        groups = [self.param_groups[k] for k in stepped]
        steps = [self.steps[k] for k in stepped]
        params = [part(p) for p in params]
        if _fused_step(self.kind, params, grads, state, groups, steps):
            pass
        elif self.kind == "sgd":
            _sgd(params, grads, state.get("momentum_buffer", []), groups, steps)
        else:
            _adam(params, grads, state["exp_avg"], state["exp_avg_sq"], groups, steps)
        for k in stepped:
            self.steps[k] += 1
        return loss

    def _buffers(self) -> tuple[str, ...]:
        if self.kind != "sgd":
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if any(g["momentum"] for g in self.param_groups) else ()

    def state_dict(self) -> dict[str, Any]:
        """What torch's optimizer over the K separate peers would hold: group k is peer k's, its
        parameters numbered from k * P."""
        count = len(self.params)
        groups, state = [], {}
        for k, group in enumerate(self.param_groups):
            groups.append({**group, "params": list(range(k * count, (k + 1) * count))})
            if not self.steps[k] or (self.kind == "sgd" and not group["momentum"]):
                continue  # torch keeps no state before a peer's first step, nor without momentum
            for i, p in enumerate(self.params):
                if self.state[p]:
                    entry = {name: buffer[k].clone() for name, buffer in self.state[p].items()}
                    if self.kind != "sgd":
                        entry["step"] = torch.tensor(float(self.steps[k]))
                    state[k * count + i] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Reads what `state_dict` (or torch's optimizer over the separate peers) wrote."""
        groups, count = state_dict["param_groups"], len(self.params)
        if len(groups) != self.peers or any(len(g["params"]) != count for g in groups):
            raise ValueError(
                f"the optimizer state has {len(groups)} groups of "
                f"{[len(g['params']) for g in groups]} parameters; this stacked optimizer has "
                f"{self.peers} peers of {count}"
            )
        self.param_groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        for p in self.params:
            self.state[p] = {name: torch.zeros_like(p) for name in self._buffers()}
        for k, group in enumerate(groups):
            entries = [state_dict["state"].get(i, {}) for i in group["params"]]
            self.steps[k] = int(entries[0].get("step", 1)) if entries[0] else 0
            for p, entry in zip(self.params, entries, strict=True):
                for name, buffer in self.state[p].items():
                    if name in entry:
                        buffer[k].copy_(entry[name])


def _fused_step(
    kind: str,
    params: list[Tensor],
    grads: list[Tensor],
    state: Mapping[str, list[Tensor]],
    groups: Sequence[Mapping[str, Any]],
    steps: Sequence[int],
) -> bool:
    """Torch's fused kernel (`torch._fused_sgd_`, `_fused_adam_`, `_fused_adamw_`): one pass
    over each stacked tensor instead of one per foreach operation, for the common case of
    peers that share every option and, for Adam, their step count. Returns False, having done
    nothing, where they do not or the device has no fused kernels."""
    group = {k: v for k, v in groups[0].items() if k != "peer"}
    shared = all(g == {**group, "peer": g["peer"]} for g in groups[1:])
    if not shared or params[0].device.type not in _FUSED_DEVICES:
        return False
    lr = float(group["lr"])
    if kind == "sgd":
        if len({s == 0 for s in steps}) != 1:
            return False
        torch._fused_sgd_(
            params,
            grads,
            state.get("momentum_buffer", []),
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=lr,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=False,
            is_first_step=steps[0] == 0,
        )
        return True
    if len(set(steps)) != 1:
        return False
    # (a fill on the device, not a copy from the host, which would wait for the device)
    count = torch.full((), float(steps[0] + 1), device=params[0].device)
    fused = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
    fused(
        params,
        grads,
        state["exp_avg"],
        state["exp_avg_sq"],
        [],
        [count] * len(params),
        lr=lr,
        beta1=group["betas"][0],
        beta2=group["betas"][1],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        amsgrad=False,
        maximize=False,
    )
    return True


def _torch_group(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Torch's param group for a peer with `options`, checked by torch itself."""
    for name, neutral in UNSUPPORTED.items():
        if options.get(name, neutral) != neutral:
            raise ValueError(
                f"{name}={options[name]!r} of {kind} is not available in a stacked cohort; "
                "train the cohort unstacked for it"
            )
    probe = torch.zeros(1, requires_grad=True)
    group = OPTIMIZERS[kind]([probe], **options).param_groups[0]
    return {k: v for k, v in group.items() if k != "params"}


def _value(values: Sequence[float], like: Tensor) -> Hyper:
    """One number when the peers agree, else their [K] values on `like`'s device and dtype."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _is(h: Hyper, value: float) -> bool:
    """Whether every peer's `h` is `value`."""
    return isinstance(h, float) and h == value


def _views(h: Hyper, tensors: Sequence[Tensor]) -> Hyper | list[Tensor]:
    """`h` broadcast over each tensor's peers: a number, or a [K, 1, ...] view per tensor."""
    if isinstance(h, Tensor):
        return [h.view(-1, *[1] * (t.dim() - 1)) for t in tensors]
    return h


def _add_scaled_(out: list[Tensor], tensors: list[Tensor], h: Hyper) -> None:
    """out += h * tensors."""
    if isinstance(h, Tensor):
        torch._foreach_addcmul_(out, tensors, _views(h, tensors))
    elif h == 1.0:
        torch._foreach_add_(out, tensors)
    elif h:
        torch._foreach_add_(out, tensors, alpha=h)


def _sgd(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    groups: Sequence[Mapping[str, Any]],
    steps: Sequence[int],
) -> None:
    """torch.optim.SGD's step: weight decay, momentum (dampened after the first step),
    Nesterov, per peer."""

    def value(name: str) -> Hyper:
        return _value([g[name] for g in groups], params[0])

    weight_decay, momentum = value("weight_decay"), value("momentum")
    if not _is(weight_decay, 0.0):
        _add_scaled_(grads, params, weight_decay)
    if buffers:
        # buffer = momentum * buffer + (1 - dampening) * grad; the first step copies the grad
        fresh = [1.0 if not s else 1.0 - g["dampening"] for g, s in zip(groups, steps, strict=True)]
        torch._foreach_mul_(buffers, _views(momentum, buffers))
        _add_scaled_(buffers, grads, _value(fresh, params[0]))
        # the direction: grad + momentum * buffer (Nesterov), the buffer, or the grad (none)
        plain = [bool(g["momentum"]) and not g["nesterov"] for g in groups]
        own = _value([float(not p) for p in plain], params[0])
        of_buffer = _value(
            [
                g["momentum"] if g["nesterov"] else float(p)
                for g, p in zip(groups, plain, strict=True)
            ],
            params[0],
        )
        if _is(own, 0.0) and _is(of_buffer, 1.0):
            grads = buffers
        else:
            if not _is(own, 1.0):
                torch._foreach_mul_(grads, _views(own, grads))
            _add_scaled_(grads, buffers, of_buffer)
    _add_scaled_(params, grads, -value("lr"))


def _adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    groups: Sequence[Mapping[str, Any]],
    steps: Sequence[int],
) -> None:
    """torch.optim.Adam's step (AdamW's with decoupled weight decay), per peer."""
    like = params[0]

    def value(values: Sequence[float]) -> Hyper:
        return _value(values, like)

    lr = [float(g["lr"]) for g in groups]
    beta1, beta2 = [g["betas"][0] for g in groups], [g["betas"][1] for g in groups]
    decay = [g["weight_decay"] for g in groups]
    decoupled = [g.get("decoupled_weight_decay", False) for g in groups]
    coupled = value([d * (not c) for d, c in zip(decay, decoupled, strict=True)])
    shrink = value([1 - r * d if c else 1.0 for r, d, c in zip(lr, decay, decoupled, strict=True)])
    if not _is(shrink, 1.0):
        torch._foreach_mul_(params, _views(shrink, params))
    if not _is(coupled, 0.0):
        _add_scaled_(grads, params, coupled)
    torch._foreach_lerp_(exp_avgs, grads, _views(value([1 - b for b in beta1]), grads))
    torch._foreach_mul_(exp_avg_sqs, _views(value(beta2), exp_avg_sqs))
    squares = value([1 - b for b in beta2])
    if isinstance(squares, float):
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, squares)
    else:
        _add_scaled_(exp_avg_sqs, torch._foreach_mul(grads, grads), squares)
    count = [s + 1 for s in steps]
    step_size = value([r / (1 - b**n) for r, b, n in zip(lr, beta1, count, strict=True)])
    root = value([(1 - b**n) ** 0.5 for b, n in zip(beta2, count, strict=True)])
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, _views(root, denominators))
    torch._foreach_add_(denominators, _views(value([g["eps"] for g in groups]), denominators))
    if isinstance(step_size, float):
        torch._foreach_addcdiv_(params, exp_avgs, denominators, -step_size)
    else:
        _add_scaled_(params, torch._foreach_div(exp_avgs, denominators), -step_size)


def clip_stacked_grad_norms_(params: Sequence[Tensor], max_norms: Sequence[float | None]) -> Tensor:
    """Clips each peer's gradient (its slices of every stacked parameter) to its own total
    2-norm ``max_norms[k]`` (None: not clipped), like `torch.nn.utils.clip_grad_norm_` per peer.
    Returns the peers' norms before clipping, [K] float32."""
    grads = [p.grad for p in params if p.grad is not None]
    peers = len(max_norms)
    if not grads:
        return torch.zeros(peers)
    norms = torch.stack(
        [
            torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())), dtype=torch.float32)
            for g in grads
        ]
    )
    norm = torch.linalg.vector_norm(norms, dim=0)
    bound = torch.tensor([math.inf if m is None else m for m in max_norms], device=norm.device)
    scale = (bound / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [scale.to(g.dtype).view(-1, *[1] * (g.dim() - 1)) for g in grads])
    return norm
