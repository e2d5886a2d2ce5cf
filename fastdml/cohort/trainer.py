"""The epoch loop around a `Cohort`: data order, evaluation, checkpoints, records, progress bars.

A checkpoint holds the cohort (peers, optimizer, schedules, grad scaler), the position in the
data order (epoch and batch), every RNG state and the metrics so far, so a run killed mid-epoch
and resumed ends with the same parameters as a run that was never stopped.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdml.cohort.checkpoint import rng_state, set_rng_state
from fastdml.cohort.cohort import Cohort, StepOutput
from fastdml.cohort.optim import LRSchedule
from fastdml.cohort.plots import plot_history
from fastdml.cohort.records import MetricsLog
from fastdml.data import ResumableLoader, as_loader
from fastdml.errors import CheckpointError, ConfigError, UserError

CHECKPOINT = "checkpoint.pt"
FOLD_EVERY = 256  # steps whose outputs are added to the epoch's sums at once


class Trainer:
    """Trains a cohort for a number of epochs, evaluating it after each.

    Args:
        cohort: the cohort to train.
        train_data: a pair of tensors (inputs, targets) or a TensorDataset (batched in memory,
            in an order fixed by `seed` and the epoch), another Dataset (a DataLoader shuffled by
            a generator seeded with `seed`), or any DataLoader / iterable of (inputs, targets).
        eval_data: the same kinds, evaluated after every epoch (None: no evaluation).
        epochs: how many epochs to train in all (a resumed run counts those already done);
            not past the end of a cosine `LRSchedule`, where the learning rate is 0.
        batch_size: the batch size of loaders made here (train and eval).
        seed: the data order of loaders made here.
        out: a folder for the checkpoint, metrics.csv / metrics.jsonl and curves.png; None
            writes nothing. An existing checkpoint there is never overwritten: pass ``resume=True``
            to continue it.
        resume: continue from the checkpoint in `out`.
        checkpoint_every: also write the checkpoint every that many steps (it is always written
            at the end of each epoch).
        config: a JSON-able description of the run, stored in the checkpoint.
        progress: tqdm bars (epochs, and batches with the running loss and accuracy), on a
            terminal only (tqdm's convention): redirected to a file, they would fill it.
        tensorboard: also write TensorBoard scalars to ``out/tensorboard`` (needs tensorboard).
        plots: draw ``out/curves.png`` at the end (needs matplotlib).
        num_workers: worker processes of a DataLoader made here.
        name: shown on the progress bars.

    A DataLoader passed in resumes in the same order when its order comes from the torch RNG
    or its own generator (as with ``shuffle=True``); the batches before the resume point are
    loaded again and skipped.

    Example::

        trainer = Trainer(cohort, data.train, data.test, epochs=30, out="runs/a")
        trainer.run()  # or cohort.fit(data.train, data.test, epochs=30, out="runs/a")
        trainer.history[-1]["test_acc/ensemble"]
    """

    def __init__(
        self,
        cohort: Cohort,
        train_data: Any,
        eval_data: Any = None,
        *,
        epochs: int,
        batch_size: int = 64,
        seed: int = 0,
        out: str | Path | None = None,
        resume: bool = False,
        checkpoint_every: int | None = None,
        config: Mapping[str, Any] | None = None,
        progress: bool = True,
        tensorboard: bool = False,
        plots: bool = True,
        num_workers: int = 0,
        name: str = "",
    ) -> None:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 step, got {checkpoint_every}")
        self.cohort = cohort
        self.epochs = epochs
        self.out = Path(out) if out is not None else None
        self.checkpoint_every = checkpoint_every
        self.config = dict(config) if config is not None else None
        self.progress = progress and cohort.writes_records
        self.plots = plots and cohort.writes_records
        self.name = name
        loader_options = dict(seed=seed, num_workers=num_workers, device=cohort.device)
        self.train_loader = as_loader(
            train_data, batch_size=batch_size, shuffle=True, **loader_options
        )
        self.eval_loader = None
        if eval_data is not None:
            self.eval_loader = as_loader(
                eval_data, batch_size=batch_size, shuffle=False, **loader_options
            )
        self.epoch = 0  # epochs completed
        self.step = 0  # batches completed in the current epoch
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self._epoch_sums = self._zero_sums()
        self._outputs: list[StepOutput] = []  # steps not yet added to the sums
        self._epoch_rng: dict[str, Any] | None = None  # the loader's RNG when the epoch began
        self._resume_rng: dict[str, Any] | None = None
        self._train_seconds = 0.0
        self.log = None
        if self.out is not None:
            self._check_out(resume)
            if cohort.writes_records:
                self.log = MetricsLog(self.out, tensorboard=tensorboard)
        elif resume:
            raise UserError("resume needs the folder of the checkpoint (out)")
        if resume:
            self.load(self.out / CHECKPOINT)
        self._check_schedules(resume)

    @property
    def _no_bars(self) -> bool | None:
        """tqdm's `disable`: None shows the bars on a terminal only."""
        return None if self.progress else True

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out / CHECKPOINT if self.out is not None else None

    def _check_out(self, resume: bool) -> None:
        path = self.out / CHECKPOINT
        if resume and not path.is_file():
            raise CheckpointError(f"no checkpoint to resume at {path}")
        if not resume and path.exists():
            raise CheckpointError(f"{path} exists; resume it or choose another output folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}-{id(self)}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise UserError(f"cannot write to {self.out}: {error.strerror or error}") from None

    def _check_schedules(self, resumed: bool) -> None:
        """Refuses epochs past the end of a cosine schedule, which would train at lr 0. A
        checkpoint keeps the schedule the run began with, so a resumed run cannot stretch it."""
        scheduler = self.cohort.scheduler
        ends = [
            schedule.epochs
            for schedule in (scheduler.lr_lambdas if scheduler is not None else [])
            if isinstance(schedule, LRSchedule) and schedule.kind == "cosine"
        ]
        end = min(ends, default=self.epochs)
        if self.epochs <= end:
            return
        after = f"epoch {end + 1}" if end + 1 == self.epochs else f"epochs {end + 1}-{self.epochs}"
        if resumed:
            how = (
                f"the checkpoint keeps the schedule its run began with: resume with epochs <= "
                f"{end}, or train {self.epochs} epochs as a new run (another output folder); "
                "a constant or multistep schedule can be extended"
            )
        else:
            how = f"make the schedule for {self.epochs} epochs"
        raise ConfigError(
            f"the cosine learning-rate schedule ends at epoch {end}, so {after} would train at "
            f"lr 0; {how}"
        )

    def _zero_sums(self) -> torch.Tensor:
        """Per-peer sums over the epoch so far: ce * count, mimicry * count, correct; and count."""
        return torch.zeros(4, self.cohort.num_peers, dtype=torch.float64, device=self.cohort.device)

    def run(self) -> list[dict[str, Any]]:
        """Trains up to `epochs`; returns the history, a record per epoch."""
        epochs = tqdm(
            total=self.epochs,
            initial=self.epoch,
            desc=self.name or "epochs",
            unit="epoch",
            disable=self._no_bars,
            dynamic_ncols=True,
        )
        try:
            with epochs:
                while self.epoch < self.epochs:
                    self._train_epoch()
                    record = self._end_epoch()
                    epochs.update()
                    epochs.set_postfix_str(_summary(record), refresh=False)
        finally:
            if self.log is not None:
                self.log.close()
        if self.out is not None and self.plots and self.history:
            try:
                plot_history(self.history, self.out / "curves.png", title=self.name)
            except UserError as error:
                warnings.warn(f"no plots: {error}", stacklevel=2)
        return self.history

    def _loader_rng(self) -> dict[str, Any]:
        generator = getattr(self.train_loader, "generator", None)
        return {
            "torch": torch.get_rng_state(),
            "generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
        }

    def _batches(self) -> Iterator[Any]:
        """This epoch's batches from `self.step` on, in the order of an uninterrupted run."""
        loader = self.train_loader
        if isinstance(loader, ResumableLoader):
            loader.set_epoch(self.epoch)
            return loader.iter_from(self.step)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # e.g. DistributedSampler
            sampler.set_epoch(self.epoch)
        if self.step == 0:
            return iter(loader)
        torch.set_rng_state(self._epoch_rng["torch"])
        if self._epoch_rng["generator"] is not None:
            loader.generator.set_state(self._epoch_rng["generator"])
        batches = iter(loader)
        next(itertools.islice(batches, self.step, self.step), None)  # skip the done batches
        return batches

    def _train_epoch(self) -> None:
        cohort = self.cohort
        cohort.train()
        if self.step == 0:
            self._restore_rng()
            self._epoch_rng = self._loader_rng()
            self._epoch_sums = self._zero_sums()
        batches = self._batches()
        self._restore_rng()
        total = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        bar = tqdm(
            total=total,
            initial=self.step,
            desc=f"epoch {self.epoch + 1}",
            unit="batch",
            leave=False,
            disable=self._no_bars,
            dynamic_ncols=True,
        )
        shown = time.monotonic()
        self._train_seconds = 0.0
        start = time.perf_counter()
        with bar:
            for x, target in batches:
                self._outputs.append(cohort.train_step(x, target))
                if len(self._outputs) == FOLD_EVERY:
                    self._add_outputs()
                self.step += 1
                self.global_step += 1
                bar.update()
                if not bar.disable and time.monotonic() - shown > 0.5:
                    shown = time.monotonic()
                    bar.set_postfix_str(_summary(self._train_record()), refresh=False)
                due = self.checkpoint_every and self.global_step % self.checkpoint_every == 0
                if due and self.step != total:  # the end of the epoch writes one anyway
                    self._train_seconds += time.perf_counter() - start
                    self.save()
                    start = time.perf_counter()
        self._train_seconds += time.perf_counter() - start

    def _restore_rng(self) -> None:
        """After a resume: the RNG states as they were after the last step done."""
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    def _add_outputs(self) -> None:
        """Adds the steps' outputs to the epoch's sums: a few ops for many steps, not per step."""
        if not self._outputs:
            return
        count = torch.stack([out.count for out in self._outputs]).to(self._epoch_sums.dtype)
        for row, name in enumerate(("ce", "mimicry")):
            terms = torch.stack([getattr(out, name) for out in self._outputs])
            self._epoch_sums[row] += (terms * count[:, None]).sum(0)
        self._epoch_sums[2] += torch.stack([out.correct for out in self._outputs]).sum(0)
        self._epoch_sums[3] += count.sum()
        self._outputs.clear()

    def _train_record(self, combined: bool = False) -> dict[str, float]:
        """The epoch's training terms so far: this process's, or all processes' when
        `combined` (a collective call in a distributed cohort)."""
        self._add_outputs()
        sums = self.cohort.combine(self._epoch_sums) if combined else self._epoch_sums
        ce, mimicry, correct, count = (sums / sums[3].clamp(min=1)).tolist()
        criterion = self.cohort.criterion
        weight = criterion.alpha * criterion.temperature**2 if self.cohort.num_peers > 1 else 0.0
        record: dict[str, float] = {}
        for k in range(self.cohort.num_peers):
            record[f"train_loss/peer{k}"] = ce[k] + weight * mimicry[k]
            record[f"train_ce/peer{k}"] = ce[k]
            record[f"train_mimicry/peer{k}"] = mimicry[k]
            record[f"train_acc/peer{k}"] = 100.0 * correct[k]
        return record

    def _end_epoch(self) -> dict[str, Any]:
        cohort = self.cohort
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step}
        for group, k in zip(cohort.optimizer.param_groups, cohort.trainable, strict=True):
            record[f"lr/peer{k}"] = group["lr"]
        record.update(self._train_record(combined=True))
        record.update(cohort.epoch_record())
        record["train_seconds"] = self._train_seconds
        cohort.end_epoch()
        if self.eval_loader is not None:
            record.update(cohort.evaluate(self.eval_loader).record("test"))
        self.history.append(record)
        self.epoch += 1
        self.step = 0
        self._epoch_sums = self._zero_sums()
        if self.log is not None:
            self.log.write(self.history)
        self.save()
        return record

    def state_dict(self) -> dict[str, Any]:
        """All a resumed run needs: the cohort, the position, RNG states and the history."""
        self._add_outputs()
        return {
            "config": self.config,
            "cohort": self.cohort.state_dict(),
            "trainer": {
                "epoch": self.epoch,
                "step": self.step,
                "global_step": self.global_step,
                "history": self.history,
                "epoch_sums": self._epoch_sums.cpu(),
                "epoch_rng": self._epoch_rng if self.step else None,
                "rng": rng_state(),
            },
        }

    def save(self) -> None:
        """Writes the checkpoint (atomically) to ``out/checkpoint.pt``; nothing without `out`."""
        if self.out is not None:
            self.cohort.write_checkpoint(self.state_dict(), self.out / CHECKPOINT)

    def load(self, path: str | Path) -> None:
        """Restores a checkpoint written by `save`; the next `run` continues where it stopped."""
        state = self.cohort.read_checkpoint(Path(path))
        try:
            self.cohort.load_state_dict(state["cohort"])
            position = state["trainer"]
            self.epoch, self.step = position["epoch"], position["step"]
            self.global_step = position["global_step"]
            self.history = list(position["history"])
            self._epoch_sums = position["epoch_sums"].to(self.cohort.device)
            self._epoch_rng = position["epoch_rng"]
            self._resume_rng = position["rng"]
        except (KeyError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this cohort: {reason}") from None


def _summary(record: Mapping[str, Any]) -> str:
    """The peers' mean train loss and accuracy, test accuracy and the ensemble's, in a line."""

    def mean(prefix: str) -> float | None:
        values = [v for k, v in record.items() if k.startswith(prefix)]
        return sum(values) / len(values) if values else None

    parts = [
        (name, mean(prefix))
        for name, prefix in (
            ("loss", "train_loss/"),
            ("acc", "train_acc/"),
            ("test", "test_acc/peer"),
            ("ens", "test_acc/ensemble"),
        )
    ]
    return " ".join(f"{name} {value:.3g}" for name, value in parts if value is not None)
