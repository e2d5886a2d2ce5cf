"""The options of the mutual loss, as one record checked once.

`mutual_loss`, `MutualLoss`, `fused_linear_mutual_loss`, `FusedLinearMutualLoss` and the cohort
all take their options through `LossOptions`: adding an option is one field and its check here
(plus what the kernels do with it).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MODES = ("pairwise", "ensemble", "ensemble_logits")
# The command line names the modes after the paper; Python names what they compute.
# (`fastdml.cli.config` adds "independent", alpha = 0, and "distill", peer weights.)
CLI_MODE_NAMES = {"dml": "pairwise", "dml_e": "ensemble", "dml_logits": "ensemble_logits"}
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")

PeerWeights = Tensor | Sequence[Sequence[float]]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class LossOptions:
    """The options of the mutual loss of K peers; each is checked when the record is made.

    For peer k and row n the loss is ``CE(z_kn, y_n) + alpha * T**2 * M_kn`` (docs/loss.md):

    Args:
        temperature: T > 0, the softmax temperature of the mimicry term.
        alpha: the mimicry weight, >= 0 (0 trains each peer alone).
        mode: the mimicry target: "pairwise" (DML: the mean KL to each other peer),
            "ensemble" (DML_e: the KL to the other peers' mean probability) or
            "ensemble_logits" (the KL to the softmax of the other peers' mean logits).
        peer_weights: a K x K matrix W, finite and >= 0, that overrides mode:
            ``M_k = sum_j W[k, j] * KL(q_j || q_k)``; kept as a detached float64 tensor.
        label_smoothing: in [0, 1], as in `F.cross_entropy`.
        ignore_index: rows whose target is this contribute nothing.
        reduction: "mean" (each peer's mean over non-ignored rows, summed over peers: the
            "batchmean" of `F.kl_div`), "sum", or "none" ([K, N, ...]).
        return_components: return a `MutualLossOutput` with each peer's terms, not the loss only.
        backend: "auto", "torch", "cpp", "triton" or "cuda" (docs/loss.md, Backends).
    """

    temperature: float = 1.0
    alpha: float = 1.0
    mode: str = "pairwise"
    peer_weights: PeerWeights | None = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    return_components: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "return_components", bool(self.return_components))
        if self.peer_weights is not None:
            weights = torch.as_tensor(self.peer_weights, dtype=torch.float64).detach()
            object.__setattr__(self, "peer_weights", weights)
        if torch.compiler.is_compiling():
            return  # options may be symbolic there; the kernels check what they rely on
        self._check()

    def _check(self) -> None:
        t, alpha, smoothing = self.temperature, self.alpha, self.label_smoothing
        if not _is_real(t) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if not _is_real(alpha) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not _is_real(smoothing) or not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {smoothing!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(
            self.ignore_index, numbers.Integral
        ):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.mode not in MODES:
            hint = ""
            if self.mode in CLI_MODE_NAMES:
                hint = (
                    f" ({self.mode!r} is the command line's name for {CLI_MODE_NAMES[self.mode]!r})"
                )
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}{hint}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.peer_weights is not None:
            weights = self.peer_weights
            if weights.dim() != 2 or weights.shape[0] != weights.shape[1]:
                raise ValueError(
                    "peer_weights must be a K x K matrix (K peers), "
                    f"got shape {tuple(weights.shape)}"
                )
            check_peer_weight_values(weights)

    def replace(self, **changes: Any) -> LossOptions:
        """A copy with some options changed, checked again."""
        return dataclasses.replace(self, **changes)


def check_peer_weight_values(weights: Tensor) -> None:
    """Finite and non-negative (reads the data)."""
    if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError(f"peer_weights must be finite and non-negative, got {weights.tolist()}")
