"""The configuration of a training run, from a YAML/JSON file and command-line flags.

Every option has a default; a config file overrides the defaults and flags override the file.
Per-peer options (lr, momentum, weight_decay, clip_norm, lr_schedule) take one value for every
peer or a list with one per peer; an entry of `peers` may also set them for its peer, next to
its architecture's own options, e.g. ``{"arch": "mlp", "hidden": 512, "lr": 0.05}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdml.cohort.cohort import PRECISIONS, UPDATES
from fastdml.cohort.optim import OPTIMIZERS, LRSchedule
from fastdml.data import DATASETS, require
from fastdml.distributed import DEFAULT_TIMEOUT
from fastdml.errors import ConfigError
from fastdml.loss.options import CLI_MODE_NAMES
from fastdml.loss.options import MODES as LOSS_MODES
from fastdml.models import ARCHS

# Training modes and the MutualLoss mode each uses ("independent" is alpha = 0).
TRAINING_MODES = {
    "independent": "pairwise",
    **CLI_MODE_NAMES,
    "distill": "pairwise",  # with peer_weights pointing every student at the teacher
}
assert set(TRAINING_MODES.values()) <= set(LOSS_MODES)
PER_PEER = ("lr", "momentum", "weight_decay", "clip_norm", "lr_schedule")
TEACHER_KEYS = ("arch", "checkpoint", "peer", "frozen")
# Options that may change when a run is resumed; any other difference is a different run.
RESUMABLE_CHANGES = (
    "epochs",
    "device",
    "out",
    "resume",
    "checkpoint_every",
    "num_workers",
    "tensorboard",
    "compile",
    "data_dir",
    "timeout",
    "stacked",
)


@dataclass
class RunConfig:
    """One training run. `peers` are the cohort's trained peers; `teacher` an extra network,
    frozen (mode "distill", loaded from a checkpoint) or trained alongside the peers."""

    dataset: str = "mnist1d"
    data_dir: str | None = None
    train_samples: int | None = None
    peers: list[dict[str, Any]] = field(default_factory=lambda: [{"arch": "mlp"}] * 2)
    teacher: dict[str, Any] | None = None
    mode: str = "dml"
    alpha: float = 1.0
    temperature: float = 1.0
    label_smoothing: float = 0.0
    peer_weights: list[list[float]] | None = None
    update: str = "simultaneous"
    optimizer: str = "sgd"
    lr: float | list[float] = 0.05
    momentum: float | list[float] = 0.9
    nesterov: bool = True
    weight_decay: float | list[float] = 5e-4
    clip_norm: float | list[float | None] | None = None
    lr_schedule: str | list[str] = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    epochs: int = 60
    batch_size: int = 64
    precision: str = "fp32"
    device: str = "auto"
    compile: bool = False
    stacked: bool = False  # the peers as one batched model (one architecture, none frozen)
    seed: int = 0
    checkpoint_every: int | None = None
    num_workers: int = 0
    tensorboard: bool = False
    out: str = "runs/train"
    resume: bool = False
    replicas: int = 1  # distributed (torchrun): ranks per peer group, each peer data-parallel
    exchange_every: int = 1  # distributed: logits every step (1), or codistillation every n
    timeout: float = DEFAULT_TIMEOUT  # distributed: seconds a rank waits for the others

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_trained(self) -> int:
        """The trained peers: the cohort's, and a teacher trained alongside."""
        return len(self.peers) + bool(self.teacher and not self.teacher["frozen"])

    def peer_value(self, name: str, k: int) -> Any:
        """Per-peer option `name` of trained peer k (a peer entry wins over the run's value)."""
        entries = self.peers + ([self.teacher] if self.num_trained > len(self.peers) else [])
        if name in entries[k]:
            return entries[k][name]
        value = getattr(self, name)
        return value[k] if isinstance(value, list) else value


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a .json, .yaml or .yml file (a mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    if path.suffix == ".json":
        parse, errors = json.loads, (ValueError,)
    elif path.suffix in (".yaml", ".yml"):
        yaml = require("yaml", "pyyaml")
        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    else:
        raise ConfigError(f"config file {path} must end in .json, .yaml or .yml")
    try:
        values = parse(text)
    except errors as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"cannot parse {path}: {reason}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of options, got {type(values).__name__}")
    return values


def make_config(*layers: Mapping[str, Any]) -> RunConfig:
    """A checked `RunConfig` from mappings of options, later ones overriding earlier ones."""
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                raise ConfigError(f"unknown option {key!r}; the options are {', '.join(FIELDS)}")
            values[key] = value
    config = RunConfig(**values)
    _normalise(config)
    _check(config)
    return config


def _normalise(config: RunConfig) -> None:
    peers = config.peers
    if isinstance(peers, str):
        peers = [name.strip() for name in peers.split(",")]
    if not isinstance(peers, list) or not peers:
        raise ConfigError("peers must name at least one architecture, e.g. 'mlp,mlp'")
    config.peers = [_entry(p, "peers") for p in peers]
    if config.teacher is not None:
        config.teacher = make_teacher(config.teacher)
    for name in (
        "alpha",
        "temperature",
        "label_smoothing",
        "gamma",
        "lr",
        "momentum",
        "weight_decay",
        "clip_norm",
        "timeout",
    ):
        value = getattr(config, name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, float(value))
        elif isinstance(value, list):
            setattr(config, name, [float(v) if isinstance(v, int) else v for v in value])


def make_teacher(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A teacher entry with its defaults: frozen, peer 0 of its checkpoint, if it has one."""
    teacher = {"checkpoint": None, "peer": 0, "frozen": True, **_entry(value, "teacher")}
    if teacher["arch"] not in ARCHS:
        raise ConfigError(
            f"unknown architecture {teacher['arch']!r}; choose one of {', '.join(ARCHS)}"
        )
    return teacher


def _entry(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"arch": value}
    if isinstance(value, dict) and isinstance(value.get("arch"), str):
        return dict(value)
    raise ConfigError(f"each of {where} must be an architecture name or a mapping with 'arch'")


def _expect(name: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _check(config: RunConfig) -> None:
    choices = {
        "dataset": DATASETS,
        "mode": tuple(TRAINING_MODES),
        "update": UPDATES,
        "optimizer": tuple(OPTIMIZERS),
        "precision": tuple(PRECISIONS),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(
                f"unknown {name} {getattr(config, name)!r}; choose one of {', '.join(allowed)}"
            )
    for name in ("epochs", "batch_size", "seed", "num_workers"):
        _expect(name, getattr(config, name), int, "an integer")
    for name in ("epochs", "seed", "num_workers"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("batch_size", "train_samples", "checkpoint_every", "replicas", "exchange_every"):
        value = getattr(config, name)
        if value is not None:
            _expect(name, value, int, "a positive integer")
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
    for name in ("alpha", "temperature", "label_smoothing", "gamma", "timeout"):
        _expect(name, getattr(config, name), float, "a number")
    if not isinstance(config.milestones, list):
        raise ConfigError(f"milestones must be a list of epochs, got {config.milestones!r}")
    for milestone in config.milestones:
        _expect("each milestone", milestone, int, "an epoch number")
    for name in ("nesterov", "compile", "stacked", "tensorboard", "resume"):
        _expect(name, getattr(config, name), bool, "true or false")
    for name in ("device", "out"):
        _expect(name, getattr(config, name), str, "a string")
    for entry in config.peers:
        if entry["arch"] not in ARCHS:
            raise ConfigError(
                f"unknown architecture {entry['arch']!r}; choose one of {', '.join(ARCHS)}"
            )
    _check_teacher(config)
    _check_per_peer(config)
    if config.peer_weights is not None and config.mode == "distill":
        raise ConfigError("mode 'distill' sets the peer weights itself; leave peer_weights out")


def _check_teacher(config: RunConfig) -> None:
    teacher = config.teacher
    if config.mode == "distill":
        if teacher is None or not teacher["frozen"]:
            raise ConfigError("mode 'distill' needs a frozen teacher loaded from a checkpoint")
    elif teacher is not None and teacher["frozen"]:
        raise ConfigError(
            "a frozen teacher is for mode 'distill'; to train it alongside the peers, "
            "make it trainable (teacher frozen: false, or --teacher-trainable)"
        )
    if teacher is not None:
        if teacher["frozen"] and not teacher["checkpoint"]:
            raise ConfigError("a frozen teacher needs its weights: give teacher_checkpoint")
        _expect("teacher peer", teacher["peer"], int, "an integer")
        _expect("teacher frozen", teacher["frozen"], bool, "true or false")


def _check_per_peer(config: RunConfig) -> None:
    trained = config.num_trained
    for name in PER_PEER:
        value = getattr(config, name)
        if isinstance(value, list) and len(value) != trained:
            raise ConfigError(
                f"{name} must be one value or one per trained peer ({trained}), got {value}"
            )
        for k in range(trained):
            value = config.peer_value(name, k)
            if name == "lr_schedule":
                if value not in LRSchedule.KINDS:
                    raise ConfigError(
                        f"unknown lr_schedule {value!r}; "
                        f"choose one of {', '.join(LRSchedule.KINDS)}"
                    )
            elif value is not None or name != "clip_norm":
                _expect(name, value, float, "a number")
                if not math.isfinite(value) or value < 0 or (name == "clip_norm" and value == 0):
                    bound = "> 0" if name == "clip_norm" else ">= 0"
                    raise ConfigError(f"{name} must be a finite number {bound}, got {value}")


def differences(stored: Mapping[str, Any], config: RunConfig) -> list[str]:
    """The options in which `config` differs from a stored run's, other than those a resumed
    run may change."""
    current, defaults = config.to_dict(), RunConfig().to_dict()  # older runs lack new options
    return [
        f"{key} is {stored.get(key, defaults[key])!r} there, {value!r} here"
        for key, value in current.items()
        if key not in RESUMABLE_CHANGES and stored.get(key, defaults[key]) != value
    ]
