"""The fused ops `torch.ops.fastdml.*`: loading them, and the C++ op's fake (shape) kernel.

The C++ schemas, kernels and autograd live in csrc/; the Triton ops, with their fake kernels and
autograd, in kernels/ (`fastdml.kernels`), which is imported on first use.

- C++ CPU and CUDA (`fused_mutual_loss` / `scale_grad_`): one call computes the loss reduced as
  asked and writes its gradient (on the CPU it also range-checks the targets; on CUDA it reduces
  on the device, with no host sync); its autograd is C++ (csrc/mutual_loss_autograd.cpp), whose
  backward rescales that gradient only where the upstream gradient is not 1.
- Triton (`triton_mutual_loss_with_grad` / `triton_scale_grad_rows_`): per-row terms; the forward
  also writes the gradient of `row_scale * loss`, so the backward, which rescales only rows whose
  upstream gradient is not `row_scale`, costs nothing for reductions "mean" and "sum".
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


def fused_loss(problem: MutualLossProblem, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """The loss and each peer's cross-entropy and mimicry, reduced as asked, from the C++ op."""
    logits = problem.logits
    compute_grad = (
        logits.requires_grad
        and torch.is_grad_enabled()
        and logits.dtype not in RECOMPUTE_GRAD_DTYPES
    )
    arguments = fused_arguments(problem, reduction, compute_grad=compute_grad)
    return torch.ops.fastdml.fused_mutual_loss(*arguments)[:3]


def with_grad_arguments(problem: MutualLossProblem, row_scale: Tensor) -> tuple:
    """The arguments of `triton_mutual_loss_with_grad` for `problem`, in schema order."""
    return (
        problem.logits,
        problem.target,
        problem.weights,
        row_scale,
        problem.mode,
        problem.temperature,
        problem.alpha,
        problem.label_smoothing,
        problem.ignore_index,
        torch.is_grad_enabled()
        and problem.logits.requires_grad
        and problem.logits.dtype not in RECOMPUTE_GRAD_DTYPES,
    )


def triton_loss_rows(
    problem: MutualLossProblem, row_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, cross-entropy and mimicry [K, R] from the Triton op."""
    op = torch.ops.fastdml.triton_mutual_loss_with_grad
    return op(*with_grad_arguments(problem, row_scale))[:3]


def _fused_fake(
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
    torch.library.register_fake("fastdml::fused_mutual_loss", _fused_fake)
    torch.library.register_fake("fastdml::scale_grad_", lambda grad, grad_loss: None)
