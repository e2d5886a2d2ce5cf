"""A training run from a `RunConfig`: its data, its cohort, and the trainer that runs it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastdml.cli.config import PER_PEER, TEACHER_KEYS, TRAINING_MODES, RunConfig, differences
from fastdml.cohort.checkpoint import load_checkpoint, load_peer_weights
from fastdml.cohort.cohort import Cohort, resolve_device
from fastdml.cohort.optim import LRSchedule
from fastdml.cohort.trainer import CHECKPOINT, Trainer
from fastdml.data import DataSplits, load_dataset
from fastdml.distributed import (
    DistributedCohort,
    init_from_environment,
    launched,
    local_device,
    seed_rank,
)
from fastdml.errors import CheckpointError, ConfigError
from fastdml.loss.mutual_loss import MutualLoss
from fastdml.models import build_model
from fastdml.stacked.cohort import StackedCohort


def seed_everything(seed: int) -> None:
    """Seeds torch, NumPy and `random`: the same seed gives the same initial weights."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)


def load_data(config: RunConfig) -> DataSplits:
    return load_dataset(
        config.dataset, data_dir=config.data_dir, train_samples=config.train_samples
    )


def peer_model(entry: dict[str, Any], data: DataSplits, extra: tuple[str, ...] = ()) -> nn.Module:
    """A fresh model for a `peers` entry: its architecture with its own options."""
    skip = {"arch", *PER_PEER, *extra}
    options = {key: value for key, value in entry.items() if key not in skip}
    return build_model(entry["arch"], data.input_shape, data.num_classes, **options)


def _teacher(config: RunConfig, data: DataSplits) -> nn.Module:
    teacher = config.teacher
    model = peer_model(teacher, data, TEACHER_KEYS)
    if teacher["checkpoint"]:
        weights = load_peer_weights(teacher["checkpoint"], teacher["peer"])
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"teacher checkpoint {teacher['checkpoint']} does not fit a {teacher['arch']} "
                f"for {data.num_classes} classes: {reason}"
            ) from None
    return model


def _device(name: str) -> torch.device:
    try:
        device = local_device(resolve_device(name))
        torch.empty(0, device=device)  # the device exists in this build and on this machine
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = str(error).strip().splitlines()[0].split(". ")[0]
        raise ConfigError(f"device {name!r} cannot be used here: {reason}") from None
    return device


def build_cohort(config: RunConfig, data: DataSplits) -> Cohort:
    """The cohort of `config` (peers, then the teacher if any), freshly initialised."""
    models = [peer_model(entry, data) for entry in config.peers]
    frozen = []
    if config.teacher is not None:
        models.append(_teacher(config, data))
        if config.teacher["frozen"]:
            frozen.append(len(models) - 1)
    peer_weights = config.peer_weights
    if config.mode == "distill":  # every student imitates the teacher, the last peer
        peer_weights = [
            [float(j == len(models) - 1 and k != j) for j in range(len(models))]
            for k in range(len(models))
        ]
    device = _device(config.device)
    kind, placement = _distribution(config, data, device)
    sgd = config.optimizer == "sgd"
    peer_options = []
    for k in range(config.num_trained):
        momentum = config.peer_value("momentum", k)
        peer_options.append(
            {
                "lr": config.peer_value("lr", k),
                "weight_decay": config.peer_value("weight_decay", k),
                **({"momentum": momentum} if sgd else {"betas": (momentum, 0.999)}),
            }
        )
    schedules = [
        LRSchedule(
            config.peer_value("lr_schedule", k),
            epochs=max(config.epochs, 1),
            milestones=tuple(config.milestones),
            gamma=config.gamma,
        )
        for k in range(config.num_trained)
    ]
    try:
        criterion = MutualLoss(
            temperature=config.temperature,
            alpha=0.0 if config.mode == "independent" else config.alpha,
            mode=TRAINING_MODES[config.mode],
            peer_weights=peer_weights,
            label_smoothing=config.label_smoothing,
        )
        return kind(
            models,
            criterion,
            frozen=frozen,
            optimizer=config.optimizer,
            options={"nesterov": config.nesterov} if sgd else {},
            peer_options=peer_options,
            clip_norm=[config.peer_value("clip_norm", k) for k in range(config.num_trained)],
            lr_schedule=schedules,
            update=config.update,
            precision=config.precision,
            device=device,
            compile=config.compile,
            **placement,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None


def _distribution(
    config: RunConfig, data: DataSplits, device: torch.device
) -> tuple[type[Cohort], dict[str, Any]]:
    """A plain cohort, or under torchrun a distributed one (joining the job) whose ranks check
    that they agree on the class count and on every option."""
    if not launched():
        if config.replicas > 1 or config.exchange_every > 1:
            raise ConfigError(
                "replicas and exchange_every are for a distributed job: launch fastdml train "
                "with torchrun (docs/distributed.md)"
            )
        return StackedCohort if config.stacked else Cohort, {}
    if config.stacked:
        raise ConfigError("stacked peers run in one process: leave out --stacked under torchrun")
    if config.num_workers == 0 and not isinstance(data.train, TensorDataset):
        raise ConfigError(
            f"under torchrun, {config.dataset} (read from disk, with random augmentations) needs "
            "--num-workers 1 or more: the loader's workers draw the same augmentations on every "
            "rank, the main process draws from the rank's own generator"
        )
    init_from_environment(device, config.timeout)
    agree_on = {"the class count": data.num_classes}
    agree_on.update((f"option {key}", value) for key, value in config.to_dict().items())
    placement = {"replicas": config.replicas, "exchange_every": config.exchange_every}
    return DistributedCohort, {**placement, "agree_on": agree_on}


def stored_config(out: str | Path) -> dict[str, Any]:
    """The configuration of the run whose checkpoint is in `out`."""
    path = Path(out) / CHECKPOINT
    stored = load_checkpoint(path).get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} holds no run configuration to resume from")
    return stored


def check_resumable(stored: dict[str, Any], config: RunConfig) -> None:
    """Refuses to resume a checkpoint with options that make it a different run."""
    changed = differences(stored, config)
    if changed:
        raise ConfigError(f"the checkpoint in {config.out} is of a different run: {changed[0]}")


def make_trainer(
    config: RunConfig, data: DataSplits, *, progress: bool = True, name: str = ""
) -> Trainer:
    """The trainer of a run: seeds everything, builds the cohort, and resumes if asked (a
    checkpoint of the same run only). A rank of a distributed job then draws its own random
    numbers (dropout), from the seed and its rank."""
    if config.resume:
        check_resumable(stored_config(config.out), config)
    seed_everything(config.seed)
    cohort = build_cohort(config, data)
    if isinstance(cohort, DistributedCohort):
        seed_rank(config.seed)
    return Trainer(
        cohort,
        data.train,
        data.test,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        out=config.out,
        resume=config.resume,
        checkpoint_every=config.checkpoint_every,
        config=config.to_dict(),
        progress=progress,
        tensorboard=config.tensorboard,
        num_workers=config.num_workers,
        name=name,
    )
