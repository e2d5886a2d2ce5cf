"""Mutual learning in Lightning: `MutualLearning`, a `LightningModule` that trains K peers as
`fastdml.Cohort` does, under a `lightning.Trainer` (its devices, strategies, precision,
checkpoints and loggers).

Needs Lightning (``pip install fastdml[lightning]``); ``import fastdml`` does not import it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fastdml.cohort.cohort import Cohort, stack_logits
from fastdml.cohort.optim import clip_grad_norms_
from fastdml.loss.mutual_loss import MutualLoss

try:
    import lightning
except ImportError as error:
    raise ImportError(
        "fastdml.lightning needs Lightning: pip install fastdml[lightning]"
    ) from error

# Cohort's options that a Lightning Trainer owns, and what to set there instead.
TRAINER_OPTIONS = {
    "device": "accelerator= and devices=",
    "precision": 'precision="bf16-mixed" (or "16-mixed" on CUDA)',
}


class MutualLearning(lightning.LightningModule):
    """K peers trained with the mutual loss by a `lightning.Trainer`, step for step as
    `fastdml.Cohort.train_step` trains them on the same batches.

    Args:
        peers: the K models; each maps a batch of inputs to logits [N, C] (or [N, C, d1, ...]).
        criterion: a `MutualLoss` (reduction "mean"); None is the paper's DML.
        options: `Cohort`'s keyword arguments (frozen, optimizer, options, peer_options,
            clip_norm, lr_schedule, update, compile), with the same meaning. ``device`` and
            ``precision`` belong to the Trainer: ``accelerator=``/``devices=`` and
            ``precision="bf16-mixed"``.

    The batches are pairs ``(inputs, targets)``. The module uses Lightning's manual optimization:
    automatic optimization clips every parameter against one bound and makes one backward and
    one step per batch, while mutual learning clips each peer against its own bound and, in the
    alternating order (the paper's Algorithm 1), steps the peers in turn. The backward and the
    steps still go through Lightning (``manual_backward`` and the optimizer it wraps), so its
    precision, strategies (DDP's gradient all-reduce) and step count apply. Hence the Trainer's
    ``gradient_clip_val`` and ``accumulate_grad_batches`` are not available: use ``clip_norm``.
    The optimizer is Cohort's (a param group per trained peer), and so are the per-epoch
    ``lr_schedule`` and the checks of every option. In the alternating order each peer's step
    counts as one of the Trainer's steps (``max_steps``, ``every_n_train_steps``). Under DDP, the
    alternating order needs ``strategy="ddp_find_unused_parameters_true"`` (each backward reaches
    one peer only).

    Logged, with each peer's index in the key (``peer0``, ``peer1``, ...): ``train_ce/peerk``,
    ``train_mimicry/peerk`` (M_k, before the alpha * T^2 weight), ``train_acc/peerk`` (%) and
    ``train_acc/ensemble`` (the mean of the trained peers' probabilities) at every step, on
    this process's batch; the same with ``val_`` as epoch means over every process's
    validation batches.

    Example::

        module = MutualLearning([small, large], MutualLoss(), peer_options=[{"lr": 0.05}, {}],
                                clip_norm=[None, 5.0])
        lightning.Trainer(max_epochs=10, precision="bf16-mixed").fit(module, train, val)
    """

    def __init__(
        self, peers: Sequence[nn.Module], criterion: MutualLoss | None = None, **options: Any
    ) -> None:
        super().__init__()
        for name, instead in TRAINER_OPTIONS.items():
            if name in options:
                raise TypeError(
                    f"MutualLearning takes no {name!r}: the Trainer sets it ({instead})"
                )
        self.automatic_optimization = False
        self._cohort = _LightningCohort(self, peers, criterion, **options)
        self.peers = self._cohort.peers  # submodules, so Lightning moves and saves them
        self.criterion = self._cohort.criterion

    def forward(self, x: Tensor) -> Tensor:
        """Every peer's logits on `x`, stacked [K, N, C, ...] (the trained peers' with
        gradients when they are enabled)."""
        return stack_logits(self._cohort._logits(x, grad=torch.is_grad_enabled()))

    def train(self, mode: bool = True) -> MutualLearning:
        """Frozen teachers stay in eval mode."""
        super().train(mode)
        for k in self._cohort.frozen:
            self.peers[k].eval()
        return self

    def configure_optimizers(self) -> Optimizer | tuple[list[Optimizer], list[LRScheduler]]:
        if self._cohort.scheduler is None:
            return self._cohort.optimizer
        return [self._cohort.optimizer], [self._cohort.scheduler]

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, target = batch
        ce, mimicry, z = self._cohort._update_peers(x, target)
        self._log_terms("train", ce, mimicry, z, target)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, target = batch
        _, ce, mimicry, z = self._cohort._loss(self(x), target)
        self._log_terms("val", ce, mimicry, z, target, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Clips each peer's gradients to its own bound (after a GradScaler unscaled them)."""
        if any(norm is not None for norm in self._cohort.clip_norm):
            clip_grad_norms_(optimizer, self._cohort.clip_norm)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Brings the per-epoch schedules to the current epoch. Checked at every batch rather
        than stepped at an epoch's end: a run resumed from a checkpoint written after an epoch's
        last batch goes on with the next epoch without the hooks between the two."""
        scheduler = self._cohort.scheduler
        if scheduler is None or scheduler.last_epoch >= self.current_epoch:
            return
        with warnings.catch_warnings():
            # After a resume no optimizer step has run in this process yet, so torch's check
            # that the schedule steps after the optimizer misfires.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for _ in range(self.current_epoch - scheduler.last_epoch):
                self._cohort.end_epoch()

    def _log_terms(
        self, stage: str, ce: Tensor, mimicry: Tensor, z: Tensor, target: Tensor, **options: Any
    ) -> None:
        """Logs each peer's [K] terms and the accuracies of the peers' logits z [K, N, C, ...]
        and of their ensemble, without a host synchronisation."""
        count = (target != self.criterion.ignore_index).sum().clamp(min=1)
        ensemble = z[self._cohort.trainable].float().softmax(2).sum(0).argmax(1)
        predictions = torch.cat([z.argmax(2), ensemble.unsqueeze(0)])  # [K + 1, N, ...]
        accuracy = 100.0 * (predictions == target).flatten(1).sum(1) / count  # [K + 1]
        metrics: dict[str, Tensor] = {f"{stage}_acc/ensemble": accuracy[-1]}
        for k in range(len(self.peers)):
            metrics[f"{stage}_ce/peer{k}"] = ce[k]
            metrics[f"{stage}_mimicry/peer{k}"] = mimicry[k]
            metrics[f"{stage}_acc/peer{k}"] = accuracy[k]
        self.log_dict(metrics, batch_size=target.numel(), **options)


class _LightningCohort(Cohort):
    """The cohort inside a `MutualLearning` module. Its backward and optimizer steps go through
    the module; its device and precision are the Trainer's (Lightning moves the peers and runs
    the steps under its autocast), so the cohort's own are left at "cpu" and "fp32"."""

    def __init__(
        self,
        module: MutualLearning,
        peers: Sequence[nn.Module],
        criterion: MutualLoss | None,
        **options: Any,
    ) -> None:
        super().__init__(peers, criterion, device="cpu", **options)
        self.module = module

    def _apply(self, loss: Tensor) -> None:
        optimizer = self.module.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.module.manual_backward(loss)
        optimizer.step()  # clipped per peer first, by MutualLearning.on_before_optimizer_step
