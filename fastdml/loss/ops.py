"""The fused ops `torch.ops.fastdml.*`: loading them, the one Python path to them, and their fake
(shape) kernel.

The C++ schemas, kernels and autograd live in csrc/; the Triton ops, with their autograd, in
kernels/ (`fastdml.kernels`), which is imported on first use.

Both take the same arguments and keep one contract: one call computes the loss reduced as asked
(on the device: no host sync on CUDA) with each peer's terms, and writes the gradient of
sum(grad_scale * loss); its backward rescales that gradient in place only where the upstream
gradient is not 1, so that for reductions "mean" and "sum" it costs one kernel that returns at
once. The C++ ops are `fused_mutual_loss` / `scale_grad_` (CPU and CUDA kernels; on the CPU they
also range-check the targets) with a C++ autograd (csrc/mutual_loss_autograd.cpp); the Triton
ones `triton_fused_mutual_loss` / `triton_scale_grad_`, with the same autograd in Python.
"""

from __future__ import annotations

import platform

import torch
from torch import Tensor

from fastdml.loss.arguments import MutualLossProblem, accumulation_dtype


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


_TRITON_NOT_LOADED = "not loaded"
_triton_error: str | None = _TRITON_NOT_LOADED


def _load_triton() -> None:
    global _triton_error
    if torch.version.hip is not None:
        _triton_error = "the Triton kernels are written for NVIDIA GPUs (inline PTX), not ROCm"
        return
    try:
        from fastdml.kernels import mutual_loss  # noqa: F401
    except ImportError as error:
        _triton_error = f"the Triton kernels need the triton package ({error})"
    else:
        _triton_error = None


def triton_error() -> str | None:
    """Why the Triton ops cannot be used here, or None. The first call imports fastdml.kernels,
    which imports Triton and registers the ops: about a second, paid only by a caller that asks
    for the Triton backend (by name, or "auto" choosing it on CUDA tensors), not by
    `import fastdml`."""
    if _triton_error is _TRITON_NOT_LOADED:
        _load_triton()  # under torch.compile too: Dynamo runs the import while it traces
    return _triton_error


def _cuda_kernels_error() -> str | None:
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastdml::fused_mutual_loss", "CUDA"):
        return (
            "the compiled extension fastdml._C was built without its CUDA kernels "
            "(they build with a CUDA build of torch and nvcc)"
        )
    return None


CUDA_ERROR = _cuda_kernels_error()


# float16 gradients are computed in the backward, with the upstream gradient folded in before the
# cast: the forward's gradient of row_scale * loss, rescaled later, would flush to zero where a loss
# scale (GradScaler's) should have kept it. float32 and bfloat16 have the exponent range to rescale.
RECOMPUTE_GRAD_DTYPES = (torch.float16,)


def fused_arguments(
    problem: MutualLossProblem,
    reduction: str,
    grad_scale: Tensor | None = None,
    compute_grad: bool = True,
) -> tuple:
    """The arguments of `fastdml::fused_mutual_loss` for `problem`, in schema order."""
    return (
        problem.logits,
        problem.target,
        problem.peer_weights,
        grad_scale,
        problem.mode,
        problem.temperature,
        problem.alpha,
        problem.label_smoothing,
        problem.ignore_index,
        reduction,
        compute_grad,
        problem.divergence,
        problem.beta,
        problem.ce_weight,
        problem.mimic_unlabeled,
        _normalizer(problem, reduction),
    )


def _normalizer(problem: MutualLossProblem, reduction: str) -> Tensor | None:
    """The normalizer as the op takes it: a 0-dim tensor (a number becomes one of the
    accumulation dtype; a tensor, detached; both on the logits' device). It divides a mean:
    per-row terms and sums leave it out, as the reference's do."""
    normalizer, logits = problem.normalizer, problem.logits
    if normalizer is None or reduction != "mean":
        return None
    if isinstance(normalizer, Tensor):
        return normalizer.detach().to(logits.device, non_blocking=True)
    return torch.tensor(
        float(normalizer), dtype=accumulation_dtype(logits.dtype), device=logits.device
    )


# The fused op of each backend that has one, `torch.ops.fastdml.<name>`: the C++ op (CPU and CUDA
# kernels) and the Triton op, which takes the same arguments and keeps the same contract.
FUSED_OPS = {
    "cpp": "fused_mutual_loss",
    "triton": "triton_fused_mutual_loss",
    "cuda": "fused_mutual_loss",
}


def fused_op(backend: str):
    """`backend`'s fused op, looked up on use: the Triton ops register on first use."""
    if backend == "triton":
        triton_error()
    return getattr(torch.ops.fastdml, FUSED_OPS[backend])


def fused_loss(backend: str):
    """The loss of `backend`'s fused op: (problem, reduction) -> the loss and each peer's
    cross-entropy and mimicry, reduced as asked."""

    def loss(problem: MutualLossProblem, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
        logits = problem.logits
        compute_grad = (
            logits.requires_grad
            and torch.is_grad_enabled()
            and logits.dtype not in RECOMPUTE_GRAD_DTYPES
        )
        arguments = fused_arguments(problem, reduction, compute_grad=compute_grad)
        return fused_op(backend)(*arguments)[:3]

    return loss


def fused_fake(
    logits,
    target,
    weights,
    grad_scale,
    mode,
    temperature,
    alpha,
    label_smoothing,
    ignore_index,
    reduction,
    compute_grad,
    divergence="kl",
    beta=0.5,
    ce_weight=1.0,
    mimic_unlabeled=False,
    normalizer=None,
):
    k, rows, _ = logits.shape
    acc = accumulation_dtype(logits.dtype)
    per_peer = logits.new_empty((k, rows) if reduction == "none" else (k,), dtype=acc)
    loss = per_peer if reduction == "none" else logits.new_empty((), dtype=acc)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return torch.empty_like(loss), per_peer, torch.empty_like(per_peer), grad


if EXTENSION_ERROR is None:
    torch.library.register_fake("fastdml::fused_mutual_loss", fused_fake)
    torch.library.register_fake("fastdml::scale_grad_", lambda grad, grad_loss: None)
