"""Data for cohorts: the embedded datasets, and a loader whose order a checkpoint can resume.

MNIST-1D is generated offline by the `mnist1d` package (its `make_dataset` with its default
arguments: 4000 training and 1000 test sequences of length 40, 10 classes) and never downloaded;
scikit-learn's digits (8x8 images as 64 features) is the second embedded choice. CIFAR-10/100 come
from torchvision for users who have the data. Any torch Dataset or DataLoader plugs in as well.
"""

from __future__ import annotations

import functools
import importlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fastdml.errors import UserError

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100")


@dataclass(frozen=True)
class DataSplits:
    """A dataset's training and test sets, with what models need to know of it."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


def require(module: str, package: str) -> ModuleType:
    """Imports an optional dependency, or says in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the {package} package: pip install {package}") from None


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, train_samples: int | None = None
) -> DataSplits:
    """The named dataset; `train_samples` keeps only the first that many training examples.

    Args:
        name: "mnist1d" or "digits" (generated or bundled offline), "cifar10" or "cifar100"
            (from torchvision's files in `data_dir`).

    Returns:
        `DataSplits`: the ``train`` and ``test`` Datasets of (input, target) pairs, with
        ``input_shape`` (one example's, without the batch) and ``num_classes``.

    Example::

        data = load_dataset("mnist1d")
        model = build_model("mlp", data.input_shape, data.num_classes)
    """
    if name == "mnist1d":
        x, y, x_test, y_test = _mnist1d()
        splits = _tensor_splits(name, x.reshape(len(x), -1), y, x_test, y_test, num_classes=10)
    elif name == "digits":
        splits = _digits()
    elif name in ("cifar10", "cifar100"):
        splits = _cifar(name, data_dir)
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if train_samples is None:
        return splits
    if not 0 < train_samples <= len(splits.train):
        raise UserError(
            f"train_samples must be in [1, {len(splits.train)}] for {name}, got {train_samples}"
        )
    if isinstance(splits.train, TensorDataset):
        train = TensorDataset(*(t[:train_samples] for t in splits.train.tensors))
    else:
        train = Subset(splits.train, range(train_samples))
    return DataSplits(name, train, splits.test, splits.num_classes, splits.input_shape)


@functools.lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data_module = require("mnist1d.data", "mnist1d")
    # make_dataset seeds the global `random` and NumPy generators; leave the caller's untouched.
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = data_module.make_dataset(data_module.get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _digits() -> DataSplits:
    datasets = require("sklearn.datasets", "scikit-learn")
    digits = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))  # a fixed 80/20 split
    cut = int(0.8 * len(order))
    x, y = digits.data / 16.0, digits.target
    return _tensor_splits(
        "digits", x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], num_classes=10
    )


def _tensor_splits(name: str, x, y, x_test, y_test, *, num_classes: int) -> DataSplits:
    def pair(inputs, labels):
        return TensorDataset(
            torch.as_tensor(inputs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)
        )

    return DataSplits(name, pair(x, y), pair(x_test, y_test), num_classes, tuple(x.shape[1:]))


CIFAR_STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(name: str, data_dir: str | Path | None) -> DataSplits:
    if data_dir is None:
        raise UserError(f"{name} is read from disk: give its folder with --data-dir")
    datasets = require("torchvision.datasets", "torchvision")
    transforms = require("torchvision.transforms", "torchvision")
    normalize = transforms.Normalize(*CIFAR_STATS[name])
    augment = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(str(data_dir), train=True, transform=augment)
        test = cls(str(data_dir), train=False, transform=plain)
    except RuntimeError:
        raise UserError(
            f"{name} not found under {data_dir}; fetch it once with "
            f"torchvision.datasets.{cls.__name__}({str(data_dir)!r}, download=True)"
        ) from None
    return DataSplits(name, train, test, 10 if name == "cifar10" else 100, (3, 32, 32))


@runtime_checkable
class ResumableLoader(Protocol):
    """A loader whose order depends only on the epoch, and that can start mid-epoch."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, step: int) -> Iterator[Any]: ...


class InMemoryLoader:
    """Batches of in-memory tensors in an order fixed by (seed, epoch).

    One gather per batch (a DataLoader over a TensorDataset indexes sample by sample), and a
    resume that starts at any batch without touching the ones before it.
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("InMemoryLoader needs one or more tensors of the same length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        """This epoch's permutation of the examples."""
        n = len(self.tensors[0])
        if not self.shuffle:
            return torch.arange(n)
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def iter_from(self, step: int) -> Iterator[tuple[Tensor, ...]]:
        order = self.order().to(self.tensors[0].device)
        for start in range(step * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return self.iter_from(0)


def as_loader(
    data: Any,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> Any:
    """A loader for `data`: a pair of tensors (inputs, targets) or a TensorDataset become an
    `InMemoryLoader` (moved to `device` once), another Dataset a seeded DataLoader; a loader or
    any other iterable of batches is used as it is."""
    if isinstance(data, (tuple, list)) and all(isinstance(t, Tensor) for t in data):
        data = TensorDataset(*data)
    if isinstance(data, TensorDataset):
        tensors = [t.to(device) if device is not None else t for t in data.tensors]
        return InMemoryLoader(*tensors, batch_size=batch_size, shuffle=shuffle, seed=seed)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=device is not None and device.type == "cuda",
        )
    return data
