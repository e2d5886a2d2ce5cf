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
DIVERGENCES = ("kl", "reverse_kl", "jsd")
BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")

PeerWeights = Tensor | Sequence[Sequence[float]]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class LossOptions:
    """The options of the mutual loss of K peers; each is checked when the record is made.

    For peer k and row n the loss is ``ce_weight * CE(z_kn, y_n) + alpha * T**2 * M_kn``
    (docs/loss.md):

    Args:
        temperature: T > 0, the softmax temperature of the mimicry term.
        alpha: the mimicry weight, >= 0 (0 trains each peer alone): a number or a 0-dim tensor
            (read once, when the record is made).
        mode: the mimicry target: "pairwise" (DML: the mean KL to each other peer),
            "ensemble" (DML_e: the KL to the other peers' mean probability) or
            "ensemble_logits" (the KL to the softmax of the other peers' mean logits).
        peer_weights: a K x K matrix W, finite and >= 0, that overrides mode:
            ``M_k = sum_j W[k, j] * KL(q_j || q_k)``; kept as a detached float64 tensor.
        divergence: D(t, q_k) between peer k's target t and q_k in M_k: "kl" (KL(t || q_k), the
            paper's), "reverse_kl" (KL(q_k || t)) or "jsd" (the generalized Jensen-Shannon
            divergence of weight beta; the gradient also flows through its mixture).
        beta: the weight of "jsd", in [0, 1]: ``beta * KL(t || m) + (1 - beta) * KL(q_k || m)``
            with ``m = beta * t + (1 - beta) * q_k``; 0 means KL(t || q_k) and 1 KL(q_k || t),
            as TRL's and Liger-Kernel's beta. Unused by the other divergences.
        ce_weight: the cross-entropy's weight, >= 0; 0 gives a mimicry-only loss, whose target
            may be None (every row counts) or masks rows through ignore_index.
        label_smoothing: in [0, 1], as in `F.cross_entropy`.
        ignore_index: rows whose target is this contribute nothing.
        reduction: "mean" (each peer's mean over non-ignored rows, summed over peers: the
            "batchmean" of `F.kl_div`), "sum", or "none" ([K, N, ...]).
        normalizer: for reduction "mean", divide the sum over peers and rows by this instead of
            by the rows counted (a trainer's ``num_items_in_batch``): a number > 0 or a 0-dim
            tensor (no host sync; a tensor on the CPU is checked to be > 0).
        mimic_unlabeled: rows whose target is ignore_index keep their mimicry term (no
            cross-entropy); "mean" then averages the cross-entropy over the labeled rows and the
            mimicry over all rows.
        return_components: return a `MutualLossOutput` with each peer's terms, not the loss only.
        per_peer: return each peer's loss, a tuple of K tensors that backpropagate one at a
            time in any order, each into its own peer only (for loops that step one peer at a
            time); one fused call computes them all.
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
    per_peer: bool = False
    backend: str = "auto"
    divergence: str = "kl"
    beta: float = 0.5
    ce_weight: float = 1.0
    normalizer: float | Tensor | None = None
    mimic_unlabeled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "return_components", bool(self.return_components))
        object.__setattr__(self, "mimic_unlabeled", bool(self.mimic_unlabeled))
        object.__setattr__(self, "per_peer", bool(self.per_peer))
        if isinstance(self.alpha, Tensor) and self.alpha.dim() == 0:
            object.__setattr__(self, "alpha", float(self.alpha))
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
            raise ValueError(
                f"alpha must be a finite number >= 0 (or a 0-dim tensor of one), got {alpha!r}"
            )
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
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not _is_real(self.beta) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {self.beta!r}")
        ce_weight = self.ce_weight
        if not _is_real(ce_weight) or not math.isfinite(ce_weight) or ce_weight < 0:
            raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
        if self.normalizer is not None:
            self._check_normalizer()
        if self.peer_weights is not None:
            weights = self.peer_weights
            if weights.dim() != 2 or weights.shape[0] != weights.shape[1]:
                raise ValueError(
                    "peer_weights must be a K x K matrix (K peers), "
                    f"got shape {tuple(weights.shape)}"
                )
            check_peer_weight_values(weights)

    def _check_normalizer(self) -> None:
        normalizer = self.normalizer
        if self.reduction != "mean":
            raise ValueError(
                f"normalizer divides the loss of reduction='mean', got reduction={self.reduction!r}"
            )
        if isinstance(normalizer, Tensor):
            if normalizer.dim() != 0 or normalizer.dtype == torch.bool or normalizer.is_complex():
                raise ValueError(
                    "normalizer must be a number > 0 or a 0-dim real tensor, got a tensor of "
                    f"shape {tuple(normalizer.shape)} and dtype {normalizer.dtype}"
                )
            if normalizer.device.type == "cpu" and not bool(normalizer > 0):
                raise ValueError(f"normalizer must be > 0, got {normalizer.item()!r}")
        elif not _is_real(normalizer) or not math.isfinite(normalizer) or normalizer <= 0:
            raise ValueError(
                f"normalizer must be a finite number > 0 or a 0-dim tensor, got {normalizer!r}"
            )

    @property
    def uses_family(self) -> bool:
        """Whether an option of the loss family beyond the paper's loss is set (another
        divergence, ce_weight, a normalizer, mimic_unlabeled; "jsd" at beta 0 is the KL). Every
        backend computes them; this only steers backend="auto", which prefers the Triton op for
        them on CUDA tensors (the CUDA op computes them with its generic any-K kernel, the
        slower)."""
        kl = self.divergence == "kl" or (self.divergence == "jsd" and self.beta == 0)
        return not kl or self.ce_weight != 1 or self.normalizer is not None or self.mimic_unlabeled

    def replace(self, **changes: Any) -> LossOptions:
        """A copy with some options changed, checked again."""
        return dataclasses.replace(self, **changes)


def check_peer_weight_values(weights: Tensor) -> None:
    """Finite and non-negative (reads the data)."""
    if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError(f"peer_weights must be finite and non-negative, got {weights.tolist()}")
