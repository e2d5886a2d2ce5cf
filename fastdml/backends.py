"""Which implementation computes the loss: availability, and the choice made by backend="auto"."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from fastdml import ops, reference
from fastdml.arguments import MutualLossProblem

RowsFn = Callable[[MutualLossProblem], tuple[Tensor, Tensor]]

_IMPLEMENTATIONS: dict[str, RowsFn] = {
    "torch": reference.mutual_loss_rows,
    "cpp": ops.mutual_loss_rows,
}
_DEVICE_TYPES = {"cpp": "cpu"}
_NOT_BUILT = {
    "cpp": ops.EXTENSION_ERROR,
    "triton": "the Triton kernels are not part of this version of fastdml",
    "cuda": "the CUDA kernels are not part of this version of fastdml",
}
_warned_fallback = False


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run in this installation, or None when it can."""
    return _NOT_BUILT.get(backend)


def available_backends() -> list[str]:
    """The explicit backend names that can run here (each still needs tensors on its device)."""
    return [name for name in _IMPLEMENTATIONS if unavailable_reason(name) is None]


def select(backend: str, device: torch.device) -> RowsFn:
    """The implementation for `backend` and tensors on `device`; raises if it cannot run."""
    if backend == "auto":
        return _IMPLEMENTATIONS[_auto(device)]
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    wanted = _DEVICE_TYPES.get(backend)
    if wanted is not None and device.type != wanted:
        raise ValueError(
            f"backend={backend!r} runs on {wanted} tensors, but the logits are on {device}"
        )
    return _IMPLEMENTATIONS[backend]


def _auto(device: torch.device) -> str:
    global _warned_fallback
    if device.type != "cpu":
        return "torch"
    reason = unavailable_reason("cpp")
    if reason is None:
        return "cpp"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"fastdml falls back to the slower pure-PyTorch backend on CPU: {reason}. "
            "Build it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=4,
        )
    return "torch"
