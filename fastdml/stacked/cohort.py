"""A cohort of K peers of one architecture trained as one batched model.

`StackedCohort` is a `Cohort` whose peers run as one module with stacked [K, ...] parameters
(`fastdml.stacked.stack_peers`): one forward, one backward and one optimizer step
(`StackedOptimizer`) for all K peers, where `Cohort` pays each peer's Python and dispatch cost
apart. It trains as the unstacked cohort does from the same weights and batches, to rounding,
and reads and writes the same checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdml.cohort.cohort import Cohort, Evaluation
from fastdml.cohort.optim import OptimizerFactory
from fastdml.loss.mutual_loss import MutualLoss
from fastdml.stacked.layers import stack_peers
from fastdml.stacked.optim import StackedOptimizer, clip_stacked_grad_norms_


class StackedCohort(Cohort):
    """K peers of one architecture (MLP, CNN1d, CifarResNet, WideResNet or MobileNet of
    `fastdml.models`) trained as one batched model.

    Takes `Cohort`'s arguments, with three limits: every peer is trained (a frozen teacher is
    refused: it has no optimizer state to stack, and distillation from it is an unstacked
    cohort's); the optimizer is "sgd", "adam" or "adamw" (a factory is refused), every option of
    which may differ between peers; precision is "fp32" or "bf16". Peers of different
    architectures are refused.

    The peers' modules (``cohort.peers``) hold views of their slices of the stacked tensors, so
    they are current at any time; evaluation, records and checkpoints are the unstacked
    cohort's. Every peer sees the same batch and draws its own dropout masks; batch norms keep
    each peer's running statistics. With ``update="alternating"``, each peer's turn runs the
    whole stacked forward, so a batch norm's running statistics take K updates a batch (the
    unstacked cohort's take one per forward of that peer); the parameters move the same way.

    Example::

        peers = [build_model("resnet32", (3, 32, 32), 100) for _ in range(8)]
        cohort = StackedCohort(peers, MutualLoss(), peer_options=[{"lr": 0.1}] * 8)
        cohort.fit(train_data, test_data, epochs=200)
    """

    def __init__(
        self,
        peers: Sequence[torch.nn.Module],
        criterion: MutualLoss | None = None,
        *,
        frozen: Iterable[int] = (),
        optimizer: str | OptimizerFactory = "sgd",
        precision: str = "fp32",
        **options: Any,
    ) -> None:
        if list(frozen):
            raise ValueError(
                "a stacked cohort trains every peer: a frozen teacher cannot be stacked "
                "(train a cohort with a frozen teacher unstacked)"
            )
        if precision == "fp16":
            raise ValueError(
                "a stacked cohort takes precision 'fp32' or 'bf16' ('fp16' needs a GradScaler "
                "over each peer's own parameters)"
            )
        super().__init__(peers, criterion, optimizer=optimizer, precision=precision, **options)

    def _make_optimizer(
        self,
        optimizer: str | OptimizerFactory,
        options: Mapping[str, Any] | None,
        peer_options: Sequence[Mapping[str, Any]] | None,
    ) -> StackedOptimizer:
        """The peers become one stacked model, stepped by one `StackedOptimizer`."""
        self.model = stack_peers(self.peers)
        self._stacked_forward = self._compiled(self.model)
        return StackedOptimizer(self.model, optimizer, options=options, peer_options=peer_options)

    def train(self, mode: bool = True) -> StackedCohort:
        super().train(mode)
        self.model.train(mode)
        return self

    def _logits(self, x: Tensor, grad: bool) -> Tensor:
        """Every peer's logits on `x`, [K, N, C]."""
        with torch.set_grad_enabled(grad), self._autocast():
            return self._stacked_forward(x)

    def _apply(self, loss: Tensor, peer: int | None = None) -> None:
        """Back-propagates `loss`; clips and steps every peer, or peer `peer` alone."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if any(norm is not None for norm in self.clip_norm):
            clip_stacked_grad_norms_(self.optimizer.params, self.clip_norm)
        self.optimizer.step(peer=peer)

    def _alternating_step(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 1: each peer in turn is stepped on its own loss against the current
        predictions of the others (only its logits carry gradients)."""
        ce, mimicry, z = [], [], []
        for k in range(self.num_peers):
            logits = self._logits(x, grad=True)
            mine = torch.arange(self.num_peers, device=logits.device) == k
            logits = torch.where(mine.view(-1, *[1] * (logits.dim() - 1)), logits, logits.detach())
            loss, step_ce, step_mimicry, step_z = self._loss(logits, target)
            self._apply(loss, peer=k)
            ce.append(step_ce[k])
            mimicry.append(step_mimicry[k])
            z.append(step_z[k])
        return torch.stack(ce), torch.stack(mimicry), torch.stack(z)

    def evaluate(self, data: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
        training = self.model.training
        self.model.eval()
        try:
            return super().evaluate(data)
        finally:
            self.model.train(training)
