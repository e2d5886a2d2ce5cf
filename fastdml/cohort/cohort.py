"""A cohort of peer networks trained together with the mutual loss.

`Cohort` owns the peers, the loss and one optimizer with a param group per peer; `train_step`
does one mutual-learning update on a batch, `evaluate` measures each peer and the ensemble.
`Cohort.fit` (or `fastdml.Trainer`) runs the epochs around them, with checkpoints,
records and progress bars.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdml.cohort.checkpoint import describe_layout, load_checkpoint, save_checkpoint
from fastdml.cohort.optim import OptimizerFactory, clip_grad_norms_, make_optimizer, make_scheduler
from fastdml.errors import CheckpointError
from fastdml.loss.mutual_loss import MutualLoss

if TYPE_CHECKING:
    from fastdml.cohort.trainer import Trainer

UPDATES = ("simultaneous", "alternating")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepOutput(NamedTuple):
    """One training step's per-peer terms, detached and left on the device (no host sync)."""

    ce: Tensor  # [K] each peer's mean cross-entropy on the batch
    mimicry: Tensor  # [K] each peer's mean mimicry KL M_k (before the alpha * T^2 weight)
    correct: Tensor  # [K] how many targets each peer's argmax got right
    count: Tensor  # [] how many targets counted (not ignore_index)


@dataclass(frozen=True)
class Evaluation:
    """Each peer's and the ensemble's cross-entropy, top-1 accuracy (%) and mean posterior
    entropy (nats) on a dataset. The ensemble averages the probabilities of the trained peers
    (frozen teachers are left out)."""

    loss: list[float]
    accuracy: list[float]
    entropy: list[float]
    ensemble_loss: float
    ensemble_accuracy: float
    ensemble_entropy: float

    def record(self, prefix: str = "test") -> dict[str, float]:
        """Flat ``{"test_acc/peer0": ..., "test_acc/ensemble": ...}`` for metrics logs."""
        out: dict[str, float] = {}
        for name, per_peer, ensemble in (
            ("loss", self.loss, self.ensemble_loss),
            ("acc", self.accuracy, self.ensemble_accuracy),
            ("entropy", self.entropy, self.ensemble_entropy),
        ):
            out.update({f"{prefix}_{name}/peer{k}": v for k, v in enumerate(per_peer)})
            out[f"{prefix}_{name}/ensemble"] = ensemble
        return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": the first CUDA device when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Cohort:
    """K peers of any architectures, trained with `MutualLoss` by one grouped optimizer.

    Args:
        peers: the K models; each maps a batch of inputs to logits [N, C] (or [N, C, d1, ...]).
            All must predict the same classes.
        criterion: a `MutualLoss` in any mode (its reduction must be "mean"); None is the DML
            of the paper (pairwise, alpha 1). With one peer, its cross-entropy alone.
        frozen: indices of frozen teachers: loaded weights, always in eval mode, never stepped.
            Distillation is a frozen teacher with ``peer_weights`` that point students at it.
        optimizer: "sgd" (the paper's: Nesterov momentum 0.9, lr 0.1, weight decay 5e-4),
            "adam", "adamw", or a factory ``factory(param_groups, **options)``.
        options: optimizer options shared by all trainable peers.
        peer_options: one mapping per trainable peer (in order) of its own options, e.g.
            ``[{"lr": 0.1}, {"lr": 0.05, "weight_decay": 1e-4}]``.
        clip_norm: gradient-norm bound, one for all or one per trainable peer (None: no clip).
        lr_schedule: a per-epoch learning-rate factor (e.g. `fastdml.LRSchedule`), one for
            all or one per trainable peer; stepped by `end_epoch`.
        update: "simultaneous" (one forward of every peer per batch, all peers stepped) or
            "alternating" (the paper's Algorithm 1: the peers are stepped in turn, each against
            the others' predictions recomputed after the previous update).
        precision: "fp32", "bf16" (autocast on CPU or GPU) or "fp16" (autocast with a
            GradScaler; CUDA only).
        device: where the peers run; None or "auto" picks CUDA when available.
        compile: `torch.compile` each peer's forward (True, or a mapping of its options).

    Example::

        cohort = Cohort([build_model("mlp", (40,), 10) for _ in range(2)], MutualLoss())
        out = cohort.train_step(x, y)  # one step of every peer: out.ce, out.mimicry [K]
        cohort.fit(train_loader, test_loader, epochs=10)
    """

    def __init__(
        self,
        peers: Sequence[nn.Module],
        criterion: MutualLoss | None = None,
        *,
        frozen: Iterable[int] = (),
        optimizer: str | OptimizerFactory = "sgd",
        options: Mapping[str, Any] | None = None,
        peer_options: Sequence[Mapping[str, Any]] | None = None,
        clip_norm: float | Sequence[float | None] | None = None,
        lr_schedule: Callable[[int], float] | Sequence[Callable[[int], float] | None] | None = None,
        update: str = "simultaneous",
        precision: str = "fp32",
        device: str | torch.device | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        peers = list(peers)
        if not peers or not all(isinstance(p, nn.Module) for p in peers):
            raise TypeError("peers must be a non-empty sequence of nn.Module")
        if len({id(p) for p in peers}) != len(peers):
            raise ValueError("each peer must be a distinct module (the same one was given twice)")
        frozen = sorted(set(frozen))
        if any(not 0 <= k < len(peers) for k in frozen):
            raise ValueError(f"frozen must index the {len(peers)} peers, got {frozen}")
        self.trainable = [k for k in range(len(peers)) if k not in frozen]
        if not self.trainable:
            raise ValueError("a cohort needs at least one peer that is not frozen")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on the CPU")
        self.criterion = _check_criterion(criterion, len(peers)).to(self.device)
        self.frozen = frozen
        self.update = update
        self.precision = precision
        self.peers = nn.ModuleList(peers).to(self.device)
        for k in frozen:
            self.peers[k].requires_grad_(False).eval()

        self._compile = compile
        self.optimizer = self._make_optimizer(optimizer, options, peer_options)
        self.scheduler = make_scheduler(self.optimizer, lr_schedule) if lr_schedule else None
        self.clip_norm = _per_peer(clip_norm, len(self.trainable), "clip_norm")
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self._forwards: list[Callable[[Tensor], Tensor]] = [self._compiled(p) for p in self.peers]

    writes_records = True  # one process of a distributed cohort writes records, shows progress

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def _make_optimizer(
        self,
        optimizer: str | OptimizerFactory,
        options: Mapping[str, Any] | None,
        peer_options: Sequence[Mapping[str, Any]] | None,
    ) -> torch.optim.Optimizer:
        trained = [self.peers[k] for k in self.trainable]
        return make_optimizer(optimizer, trained, options=options, peer_options=peer_options)

    def _compiled(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        """`module`, or its `torch.compile` when the cohort compiles its peers."""
        if not self._compile:
            return module
        options = dict(self._compile) if isinstance(self._compile, Mapping) else {}
        return torch.compile(module, **options)

    def train(self, mode: bool = True) -> Cohort:
        """Train (or eval) mode for the trained peers; frozen teachers stay in eval mode."""
        for k in self.trainable:
            self.peers[k].train(mode)
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, k: int, x: Tensor, grad: bool) -> Tensor:
        with torch.set_grad_enabled(grad and k not in self.frozen), self._autocast():
            return self._forwards[k](x)

    def _logits(self, x: Tensor, grad: bool) -> list[Tensor]:
        """Every peer's logits on `x`; the trained peers' with gradients when `grad`."""
        return [self._forward(k, x, grad) for k in range(self.num_peers)]

    def _loss(
        self, logits: Tensor | Sequence[Tensor], target: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The cohort's loss, each peer's [K] cross-entropy and mimicry, and the stacked logits
        (detached). `logits`: each peer's, or all of them stacked [K, N, C, ...]."""
        c = self.criterion
        if len(logits) == 1:  # no stacking: each autograd node costs a lone peer's step time
            counted = (target != c.ignore_index).sum().clamp(min=1)  # 0 rows: a loss of 0
            ce = (
                F.cross_entropy(
                    logits[0],
                    target,
                    label_smoothing=c.label_smoothing,
                    ignore_index=c.ignore_index,
                    reduction="sum",
                )
                / counted
            )
            ce_out = ce.detach().reshape(1)
            return ce, ce_out, torch.zeros_like(ce_out), logits[0].detach().unsqueeze(0)
        z = stack_logits(logits)
        out = c(z, target, return_components=True, per_peer=False)
        return out.loss, out.ce, out.mimicry, z.detach()

    def _apply(self, loss: Tensor) -> None:
        """Back-propagates `loss` and steps every group that received gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        if any(norm is not None for norm in self.clip_norm):
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            clip_grad_norms_(self.optimizer, self.clip_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def _backward(self, loss: Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def train_step(self, x: Tensor, target: Tensor) -> StepOutput:
        """One mutual-learning update of every trained peer on a batch (on any device)."""
        x = x.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        ce, mimicry, z = self._update_peers(x, target)
        counted = target != self.criterion.ignore_index
        correct = (z.argmax(2) == target).flatten(1).sum(1)
        return StepOutput(ce, mimicry, correct, counted.sum())

    def _update_peers(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Steps the trained peers on a batch in the cohort's update order: each peer's [K]
        cross-entropy and mimicry, and the logits [K, N, C, ...] they came from (detached)."""
        if self.update == "alternating":
            return self._alternating_step(x, target)
        loss, ce, mimicry, z = self._loss(self._logits(x, grad=True), target)
        self._apply(loss)
        return ce, mimicry, z

    def _alternating_step(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 1: each trained peer in turn is stepped on its own loss against the current
        predictions of the others; a peer's predictions are recomputed after its update."""
        current: list[Tensor | None] = [None] * self.num_peers  # detached, up to date
        ce, mimicry, z = [None] * self.num_peers, [None] * self.num_peers, [None] * self.num_peers
        for k in self.trainable:
            for j in range(self.num_peers):
                if j != k and current[j] is None:
                    current[j] = self._forward(j, x, grad=False)
            mine = self._forward(k, x, grad=True)
            logits = [mine if j == k else current[j] for j in range(self.num_peers)]
            loss, step_ce, step_mimicry, step_z = self._loss(logits, target)
            self._apply(loss)  # only peer k has gradients, so only its group moves
            current[k] = None  # peer k moved: the next peer sees its new predictions
            ce[k], mimicry[k], z[k] = step_ce[k], step_mimicry[k], step_z[k]
        for k in self.frozen:
            ce[k], mimicry[k], z[k] = step_ce[k], step_mimicry[k], step_z[k]
        return torch.stack(ce), torch.stack(mimicry), torch.stack(z)

    def end_epoch(self) -> None:
        """Advances the per-epoch learning-rate schedules."""
        if self.scheduler is not None:
            self.scheduler.step()

    @torch.no_grad()
    def evaluate(self, data: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
        """Each peer's and the ensemble's cross-entropy, accuracy and entropy over `data`."""
        training = [p.training for p in self.peers]
        self.peers.eval()
        ignore = self.criterion.ignore_index
        trained = torch.tensor(self.trainable, device=self.device)
        sums = torch.zeros(3, self.num_peers + 1, dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        try:
            for x, target in data:
                x = x.to(self.device, non_blocking=True)
                target = target.to(self.device, non_blocking=True)
                logits = self._logits(x, grad=False)
                logp = stack_logits(logits).float().log_softmax(2)  # [K, N, C, ...]
                ensemble = logp.index_select(0, trained).logsumexp(0, keepdim=True)
                logp = torch.cat([logp, ensemble - math.log(len(self.trainable))])
                valid = target != ignore
                index = target.clamp(min=0).expand(logp.shape[0], *target.shape).unsqueeze(2)
                nll = -logp.gather(2, index).squeeze(2)
                entropy = -(logp.exp() * logp).sum(2)
                correct = logp.argmax(2) == target
                terms = torch.stack([nll, correct.to(nll.dtype), entropy])  # [3, K + 1, N, ...]
                sums += (terms * valid).flatten(2).sum(2)
                count += valid.sum()
        finally:
            for peer, mode in zip(self.peers, training, strict=True):
                peer.train(mode)
        means = (sums / count.clamp(min=1)).tolist()
        loss, accuracy, entropy = means[0], [100.0 * a for a in means[1]], means[2]
        return Evaluation(
            loss=loss[:-1],
            accuracy=accuracy[:-1],
            entropy=entropy[:-1],
            ensemble_loss=loss[-1],
            ensemble_accuracy=accuracy[-1],
            ensemble_entropy=entropy[-1],
        )

    def state_dict(self) -> dict[str, Any]:
        """Every peer (frozen teachers too), the optimizer, the schedules and the grad scaler."""
        return {
            "peers": [peer.state_dict() for peer in self.peers],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["peers"]) != self.num_peers:
            raise ValueError(
                f"the state holds {len(state['peers'])} peers, this cohort has {self.num_peers}"
            )
        for peer, peer_state in zip(self.peers, state["peers"], strict=True):
            peer.load_state_dict(peer_state)
        self.optimizer.load_state_dict(state["optimizer"])
        for what in ("scheduler", "scaler"):
            if (getattr(self, what) is None) != (state[what] is None):
                raise ValueError(f"the state and this cohort differ in having a {what}")
            if state[what] is not None:
                getattr(self, what).load_state_dict(state[what])

    def epoch_record(self) -> dict[str, float]:
        """What the cohort adds to an epoch's record (nothing here; a distributed cohort, the
        bytes each step received)."""
        return {}

    def combine(self, sums: Tensor) -> Tensor:
        """Per-peer sums of training terms over the processes that share each batch (one here)."""
        return sums

    def write_checkpoint(self, state: Mapping[str, Any], path: Path) -> None:
        """Writes a trainer's checkpoint (`state` holds this cohort's `state_dict`)."""
        save_checkpoint(state, path)

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Reads what `write_checkpoint` wrote."""
        state = load_checkpoint(path)
        if "distributed" in state:
            raise CheckpointError(
                f"{path} was written by a distributed job of "
                f"{describe_layout(state['distributed'])}: resume it under torchrun, the same way"
            )
        return state

    def fit(self, train_data: Any, eval_data: Any = None, **options: Any) -> Trainer:
        """Trains for ``options["epochs"]`` epochs; see `fastdml.Trainer` for the options.
        Returns the trainer, whose `history` holds a record per epoch."""
        from fastdml.cohort.trainer import Trainer

        trainer = Trainer(self, train_data, eval_data, **options)
        trainer.run()
        return trainer


def stack_logits(logits: Tensor | Sequence[Tensor]) -> Tensor:
    """[K, N, C, ...]: a stacked cohort's logits as they are, a list of each peer's stacked (in
    float32 when their dtypes differ, as heterogeneous peers' may under autocast)."""
    if isinstance(logits, Tensor):
        return logits
    if len({z.dtype for z in logits}) > 1:
        logits = [z.float() for z in logits]
    return torch.stack(list(logits))


def _check_criterion(criterion: MutualLoss | None, num_peers: int) -> MutualLoss:
    criterion = MutualLoss() if criterion is None else criterion
    if not isinstance(criterion, MutualLoss):
        raise TypeError(f"criterion must be a fastdml.MutualLoss, got {type(criterion).__name__}")
    if criterion.reduction != "mean":
        raise ValueError("the cohort trains on each peer's mean loss: use reduction='mean'")
    weights = criterion.peer_weights
    if weights is not None and weights.shape != (num_peers, num_peers):
        raise ValueError(
            f"the criterion's peer_weights are {tuple(weights.shape)}, the cohort has "
            f"{num_peers} peers"
        )
    return criterion


def _per_peer(value: Any, num: int, name: str) -> list[Any]:
    if value is None or not isinstance(value, Sequence):
        return [value] * num
    if len(value) != num:
        raise ValueError(f"{name} must be one value or one per trained peer ({num}), got {value}")
    return list(value)
