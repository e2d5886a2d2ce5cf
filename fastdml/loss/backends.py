"""Which implementation computes the loss: availability, and the choice made by backend="auto"."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from fastdml.loss import ops, reference
from fastdml.loss.arguments import MutualLossProblem, accumulation_dtype

# (problem, reduction) -> the loss and each peer's cross-entropy and mimicry, reduced as asked:
# "mean" and "sum" give a 0-dim loss and [K] terms, "none" [K, R] each.
Loss = Callable[[MutualLossProblem, str], tuple[Tensor, Tensor, Tensor]]
# (problem, row_scale) -> per-row loss, cross-entropy and mimicry, each [K, R].
LossRows = Callable[[MutualLossProblem, Tensor], tuple[Tensor, Tensor, Tensor]]


def _from_terms(terms: Callable[[MutualLossProblem], tuple[Tensor, Tensor]]) -> LossRows:
    """For backends that return the two terms; autograd weighs the rows."""

    def loss_rows(problem: MutualLossProblem, row_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ce, mimicry = terms(problem)
        factor = problem.alpha * problem.temperature**2
        return problem.ce_weight * ce + factor * mimicry, ce, mimicry

    return loss_rows


def term_scales(problem: MutualLossProblem, reduction: str) -> tuple[Tensor, Tensor]:
    """The weights of each row's cross-entropy and of its mimicry in the reduced loss: 1 but for
    "mean", where they are 1 / normalizer, or 1 / the rows each term covers (the labeled rows;
    the mimicked rows, all of them with mimic_unlabeled). One tensor twice where they agree."""
    dtype, device = accumulation_dtype(problem.logits.dtype), problem.logits.device
    if reduction != "mean":
        one = torch.ones((), dtype=dtype, device=device)
        return one, one
    if problem.normalizer is not None:
        normalizer = torch.as_tensor(problem.normalizer).detach()
        scale = normalizer.to(dtype=dtype, device=device).reciprocal()
        return scale, scale
    labeled = (problem.target != problem.ignore_index).sum()
    ce_scale = labeled.clamp(min=1).to(dtype).reciprocal()
    if not problem.mimic_unlabeled:
        return ce_scale, ce_scale
    rows = max(problem.target.numel(), 1)
    return ce_scale, torch.full((), 1 / rows, dtype=dtype, device=device)


IMPLEMENTATIONS: dict[str, Loss] = {
    "torch": reference.mutual_loss,
    **{name: ops.fused_loss(name) for name in ops.FUSED_OPS},
}


def loss_rows_and_grad(
    backend: str, problem: MutualLossProblem, grad_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss, cross-entropy and mimicry [K, R] and, outside autograd, the gradient of
    ``sum(grad_scale * loss)`` with respect to the logits: for callers that run their own
    backward, such as the fused linear loss, chunk by chunk.

    grad_scale is 0-dim or [K, R] (any strides) in the accumulation dtype. The targets must be
    checked already where the backend does not.
    """
    if backend in ops.FUSED_OPS:
        return ops.fused_op(backend)(*ops.fused_arguments(problem, "none", grad_scale))
    logits = problem.logits.detach().requires_grad_()
    with torch.enable_grad():
        loss, ce, mimicry = _from_terms(reference.mutual_loss_rows)(
            dataclasses.replace(problem, logits=logits), grad_scale
        )
        (grad,) = torch.autograd.grad(loss, logits, grad_scale.expand_as(loss))
    return loss.detach(), ce.detach(), mimicry.detach(), grad


# These take targets unchecked (no host-device sync): out-of-range rows give NaN. Triton does so on
# CPU tensors too, where its interpreter runs the GPU code for tests.
CHECKS_TARGETS_IN_KERNEL = ("triton", "cuda")
# The CPU op range-checks the targets itself, in one pass before its kernel (a ValueError).
RAISES_ON_BAD_TARGETS = ("cpp",)
# backend="auto" on CUDA tensors, as measured on an H200 (BENCHMARKS.md, "GPU"): the CUDA C++ op
# is the faster up to 8192 classes, they tie at 32000, and Triton's is the faster at 128256
# (bfloat16). So "cuda" first below TRITON_FROM_CLASSES classes, then "triton". Every backend
# computes every option, but an option of the loss family (LossOptions.uses_family) takes the
# CUDA op's generic any-K kernel, slower than its fixed-K ones and than Triton's family paths:
# with one, "triton" first at any number of classes.
TRITON_FROM_CLASSES = 65536


# The most peers the CUDA op takes: it keeps per-peer statistics in shared memory (its C++ checks
# the same number). Triton's limit is its kernels' MAX_PEERS.
CUDA_MAX_PEERS = 1024
_NOT_BUILT = {"cpp": ops.EXTENSION_ERROR, "cuda": ops.CUDA_ERROR}
_warned_fallback: set[str] = set()


def needs_target_check(backend: str) -> bool:
    """Whether the targets' range must be checked before `backend` computes."""
    return backend not in RAISES_ON_BAD_TARGETS + CHECKS_TARGETS_IN_KERNEL


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run in this installation, or None when it can (for "triton", the
    first call imports Triton)."""
    if backend == "triton":
        return ops.triton_error()
    return _NOT_BUILT.get(backend)


def available_backends() -> list[str]:
    """The explicit backend names that can run on this machine: built, and with a device for
    their tensors (Triton runs on CPU tensors only under TRITON_INTERPRET=1)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [
        name
        for name in IMPLEMENTATIONS
        if any(_runs_on(name, device) for device in devices) and unavailable_reason(name) is None
    ]


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":  # CPU tensors through Triton's interpreter, for tests
        return device.type == "cuda" or (
            device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        )
    return True


_DEVICES = {
    "cpp": "cpu tensors",
    "cuda": "cuda tensors",
    "triton": "cuda tensors (cpu tensors only under TRITON_INTERPRET=1)",
}


def max_peers(backend: str) -> int | None:
    """The most peers `backend` takes (None: any number); Triton's must be loaded already."""
    if backend == "cuda":
        return CUDA_MAX_PEERS
    if backend == "triton":  # its kernels hold every per-peer value of a row in registers
        from fastdml.kernels.mutual_loss import MAX_PEERS

        return MAX_PEERS
    return None


def _too_many_peers(backend: str, num_peers: int) -> str | None:
    limit = max_peers(backend)
    if limit is not None and num_peers > limit:
        return f"it takes up to {limit} peers, got K = {num_peers}"
    return None


def select(
    backend: str, device: torch.device, num_peers: int, num_classes: int, family: bool = False
) -> str:
    """The backend that computes the loss of K peers' logits over C classes on `device`; raises
    if it cannot. `family`: whether an option of the loss family is set
    (LossOptions.uses_family), which backend="auto" computes with Triton first on CUDA tensors.
    Under torch.func transforms (grad, vmap, ...) only the pure-PyTorch backend runs: the fused
    ops' autograd is not functorch's."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"backend={backend!r} cannot run under torch.func transforms (grad, vmap, ...): "
                "its autograd is not functorch's; backend='torch' can (backend='auto' picks it)"
            )
        return "torch"
    if backend == "auto":
        return _auto(device, num_peers, num_classes, family)
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if not _runs_on(backend, device):
        raise ValueError(
            f"backend={backend!r} runs on {_DEVICES[backend]}, but the logits are on {device}"
        )
    reason = _too_many_peers(backend, num_peers)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot compute this loss: {reason}")
    return backend


def _auto(device: torch.device, num_peers: int, num_classes: int, family: bool) -> str:
    if device.type == "cpu":
        fused = ("cpp",)
    elif device.type == "cuda":
        triton_first = family or num_classes >= TRITON_FROM_CLASSES
        fused = ("triton", "cuda") if triton_first else ("cuda", "triton")
    else:
        return "torch"
    reasons = []
    for name in fused:
        reason = unavailable_reason(name) or _too_many_peers(name, num_peers)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(
            f"fastdml falls back to the slower pure-PyTorch backend on {device.type}: "
            f"{'; '.join(reasons)}. Build it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=4,
        )
    return "torch"
