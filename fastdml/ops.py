"""The native ops `torch.ops.fastdml.*`: their fake (shape) kernels and their autograd.

The schemas and the device kernels live in C++ (csrc/). The forward op returns each peer's per-row
cross-entropy and mimicry plus the log-sum-exps the backward needs, so the backward recomputes the
probabilities in one pass over the logits and writes the gradient once.
"""

from __future__ import annotations

import platform

import torch
from torch import Tensor

from fastdml.arguments import MutualLossProblem, accumulation_dtype


def _load_extension() -> str | None:
    """Loads fastdml._C, which registers the ops; returns why it cannot be used, or None."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and not torch.cpu._is_avx2_supported():
        return "the compiled extension fastdml._C needs a CPU with AVX2"
    try:
        from fastdml import _C  # noqa: F401
    except ImportError as error:
        return f"the compiled extension fastdml._C failed to import ({error})"
    return None


EXTENSION_ERROR = _load_extension()


def forward_arguments(problem: MutualLossProblem) -> tuple:
    """The arguments of `fastdml::mutual_loss_forward` for `problem`, in schema order."""
    return (
        problem.logits,
        problem.target,
        problem.weights,
        problem.mode,
        problem.temperature,
        problem.label_smoothing,
        problem.ignore_index,
    )


def mutual_loss_rows(problem: MutualLossProblem) -> tuple[Tensor, Tensor]:
    """Per-peer, per-row cross-entropy and mimicry KL, each [K, R], from the native op."""
    ce, mimicry, _ = torch.ops.fastdml.mutual_loss_forward(*forward_arguments(problem))
    return ce, mimicry


def _forward_fake(logits, target, weights, mode, temperature, label_smoothing, ignore_index):
    k, rows, _ = logits.shape
    ce = logits.new_empty((k, rows), dtype=accumulation_dtype(logits.dtype))
    return ce, torch.empty_like(ce), ce.new_empty((3, k, rows))


def _backward_fake(grad_ce, grad_mimicry, logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, weights, *options = inputs
    ctx.save_for_backward(logits, target, weights, output[2])
    ctx.options = options
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_ce, grad_mimicry, _grad_stats):
    logits, target, weights, stats = ctx.saved_tensors
    grad_logits = torch.ops.fastdml.mutual_loss_backward(
        grad_ce, grad_mimicry, logits, target, weights, stats, *ctx.options
    )
    return grad_logits, None, None, None, None, None, None


if EXTENSION_ERROR is None:
    torch.library.register_fake("fastdml::mutual_loss_forward", _forward_fake)
    torch.library.register_fake("fastdml::mutual_loss_backward", _backward_fake)
    torch.library.register_autograd(
        "fastdml::mutual_loss_forward", _backward, setup_context=_setup_context
    )
