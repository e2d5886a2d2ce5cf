"""Argument checks and the canonical row view shared by every backend.

Every backend solves the same problem: logits [K, R, C] (the K peers stacked, R = N * d1 * ... * dk
rows, classes last), an int64 target [R] and K x K mimicry weights. Bad input is rejected here,
with a message that says what was wrong and what was expected, before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastdml.loss.options import LossOptions

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Logits = Tensor | Sequence[Tensor]


@dataclass(slots=True)
class MutualLossProblem:
    """The loss of one call in the row view every backend computes on (built per call: a
    frozen dataclass would cost a microsecond more)."""

    logits: Tensor  # [K, R, C], any floating dtype of FLOAT_DTYPES, any strides
    target: Tensor  # [R] int64
    peer_weights: Tensor | None  # [K, K] in the accumulation dtype, given in mode "weights" only
    mode: str  # one of MODES, or "weights" when peer_weights were given
    temperature: float
    alpha: float
    label_smoothing: float
    ignore_index: int
    row_shape: tuple[int, ...]  # (N, d1, ..., dk): the per-peer shape of reduction="none"
    divergence: str = "kl"
    beta: float = 0.5
    ce_weight: float = 1.0
    # Rows whose target is ignore_index keep their mimicry (mimic_unlabeled, or no target given).
    mimic_unlabeled: bool = False
    normalizer: float | Tensor | None = None  # reduction "mean": the divisor of the summed loss

    @property
    def num_peers(self) -> int:
        return self.logits.shape[0]

    @property
    def weights(self) -> Tensor:
        """W[k, j], the weight of KL(q_j || q_k) in peer k's mimicry: the peer_weights, or the
        uniform (1 - I) / (K - 1) of the other modes (which the fused ops never read)."""
        if self.peer_weights is not None:
            return self.peer_weights
        k, logits = self.num_peers, self.logits
        eye = torch.eye(k, dtype=accumulation_dtype(logits.dtype), device=logits.device)
        return (1 - eye) / (k - 1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64, every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stack_peers(logits: Logits) -> Tensor:
    if isinstance(logits, Tensor):
        if logits.dim() < 3:
            raise ValueError(
                "stacked logits must have shape [K, N, C] or [K, N, C, d1, ...] (K peers), "
                f"got shape {tuple(logits.shape)}; pass a list of K tensors [N, C] to stack peers"
            )
        num_peers, dtype, peer_dims = logits.shape[0], logits.dtype, logits.dim() - 1
    elif isinstance(logits, (list, tuple)):
        for k, peer in enumerate(logits):
            if not isinstance(peer, Tensor):
                raise TypeError(f"logits[{k}] must be a Tensor, got {type(peer).__name__}")
        num_peers, first = len(logits), logits[0] if logits else None
        dtype, peer_dims = (first.dtype, first.dim()) if logits else (None, 0)
    else:
        raise TypeError(
            "logits must be a Tensor [K, N, C] or a list/tuple of K Tensors [N, C], "
            f"got {type(logits).__name__}"
        )
    if num_peers < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {num_peers}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be floating point (one of {[str(d) for d in FLOAT_DTYPES]}), got {dtype}"
        )
    if peer_dims < 2:
        raise ValueError(
            "each peer's logits must be [N, C] or [N, C, d1, ...], "
            f"got shape {tuple(logits[0].shape)}"
        )
    if isinstance(logits, Tensor):
        return logits
    for k, peer in enumerate(logits[1:], start=1):
        for what in ("shape", "dtype", "device"):
            if getattr(peer, what) != getattr(first, what):
                raise ValueError(
                    f"all peers' logits must share {what}: peer 0 has {getattr(first, what)}, "
                    f"peer {k} has {getattr(peer, what)}"
                )
    return torch.stack(logits)


def _check_target(target: Tensor | None, logits: Tensor, options: LossOptions) -> None:
    if target is None:
        if options.ce_weight != 0:
            raise ValueError(
                "target=None leaves the cross-entropy without classes: pass the targets, or "
                f"ce_weight=0 for a mimicry-only loss (got ce_weight={options.ce_weight!r})"
            )
        return
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be an int64 Tensor of class indices, got {type(target)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got dtype {target.dtype}")
    shape = logits.shape
    if target.shape != (shape[1:2] if len(shape) == 3 else shape[1:2] + shape[3:]):
        expected = (shape[1],) + tuple(shape[3:])
        raise ValueError(
            f"target must have shape {expected} to match logits of shape {tuple(logits.shape)} "
            f"(peer logits [N, C, d1, ...] take target [N, d1, ...]), got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def check_target_values(problem: MutualLossProblem) -> None:
    """Class indices in [0, C) or ignore_index. Reads the data: on a GPU, a host-device sync.

    The GPU kernels skip this check (they give NaN loss and gradient rows for an out-of-range
    target instead of a sync per call); the other backends need it before they index.
    """
    if torch.compiler.is_compiling():
        return  # value checks need the data; the kernels check indices themselves
    num_classes = problem.logits.shape[2]
    target = problem.target
    bad = (target != problem.ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target values must be in [0, {num_classes}) or equal "
            f"ignore_index={problem.ignore_index}, found {value}"
        )


def make_problem(logits: Logits, target: Tensor | None, options: LossOptions) -> MutualLossProblem:
    """Validates the tensors against the (checked) options and lays them out as rows. Without a
    target (a mimicry-only loss), every row is unlabeled and mimicked."""
    stacked = _stack_peers(logits)
    _check_target(target, stacked, options)
    target_was_none = target is None
    if target_was_none:
        shape = stacked.shape[1:2] + stacked.shape[3:]
        target = torch.full(shape, options.ignore_index, dtype=torch.int64, device=stacked.device)
    k, num_classes = stacked.shape[0], stacked.shape[2]
    normalizer, device = options.normalizer, stacked.device
    if isinstance(normalizer, Tensor) and normalizer.device.type not in ("cpu", device.type):
        raise ValueError(
            f"normalizer is on {normalizer.device} but the logits are on {device}: pass "
            "it on the logits' device (or the CPU, or as a number)"
        )
    if num_classes == 0:
        raise ValueError(
            "logits must have at least one class (C >= 1 in [K, N, C, ...]), "
            f"got shape {tuple(stacked.shape)}"
        )
    if stacked.dim() > 3:  # [K, N, C, d1, ...] -> [K, N * d1 * ..., C]
        stacked = stacked.movedim(2, -1).reshape(k, -1, num_classes)
    weights, mode = options.peer_weights, options.mode
    if weights is not None:
        if weights.shape != (k, k):
            raise ValueError(
                f"peer_weights must be a {k} x {k} matrix (K peers), "
                f"got shape {tuple(weights.shape)}"
            )
        weights = weights.to(accumulation_dtype(stacked.dtype)).to(stacked.device)
        mode = "weights"
    return MutualLossProblem(
        logits=stacked,
        target=target if target.dim() == 1 else target.reshape(-1),
        peer_weights=weights,
        mode=mode,
        temperature=float(options.temperature),
        alpha=float(options.alpha),
        label_smoothing=float(options.label_smoothing),
        ignore_index=int(options.ignore_index),
        row_shape=tuple(target.shape),
        divergence=options.divergence,
        beta=float(options.beta),
        ce_weight=float(options.ce_weight),
        mimic_unlabeled=options.mimic_unlabeled or target_was_none,
        normalizer=options.normalizer,
    )
