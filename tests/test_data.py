"""The embedded datasets, the resumable in-memory loader, and the peer architectures."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastdml.data import InMemoryLoader, ResumableLoader, as_loader, load_dataset
from fastdml.errors import ConfigError, UserError
from fastdml.models import build_model


def test_mnist1d_is_generated_offline_and_leaves_global_rngs_alone(monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated, not downloaded")

    import fastdml.data

    fastdml.data._mnist1d.cache_clear()  # generate it here, even if another test did
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    monkeypatch.setattr(mnist1d.data.requests, "get", no_download)
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    before = random.random(), np.random.rand()  # noqa: NPY002
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    data = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == before  # noqa: NPY002
    x, y = data.train.tensors
    assert x.shape == (4000, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(data.test) == 1000 and data.num_classes == 10 and data.input_shape == (40,)
    assert set(y.tolist()) == set(range(10))
    again = load_dataset("mnist1d", train_samples=100)
    assert torch.equal(again.train.tensors[0], x[:100])


def test_digits():
    data = load_dataset("digits")
    assert len(data.train) + len(data.test) == 1797 and data.input_shape == (64,)
    assert float(data.train.tensors[0].max()) <= 1.0


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("imagenet", {}, "unknown dataset 'imagenet'"),
        ("cifar100", {}, "--data-dir"),
        ("digits", {"train_samples": 0}, "train_samples must be in"),
    ],
)
def test_dataset_errors(name, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_dataset(name, **kwargs)


def test_in_memory_loader_order_is_a_function_of_seed_and_epoch():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    loader = InMemoryLoader(x, y, batch_size=4, seed=1)
    assert isinstance(loader, ResumableLoader) and len(loader) == 3
    epoch0 = torch.cat([b[1] for b in loader])
    assert sorted(epoch0.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[1] for b in loader]), epoch0)
    loader.set_epoch(1)
    epoch1 = [b[1] for b in loader]
    assert not torch.equal(torch.cat(epoch1), epoch0)
    assert [b[1].tolist() for b in loader.iter_from(1)] == [b.tolist() for b in epoch1[1:]]
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in loader)
    ordered = InMemoryLoader(x, y, batch_size=4, shuffle=False, drop_last=True)
    assert len(ordered) == 2 and torch.equal(torch.cat([b[1] for b in ordered]), torch.arange(8))
    with pytest.raises(ValueError, match="same length"):
        InMemoryLoader(x, y[:3], batch_size=2)


def test_as_loader_kinds():
    x, y = torch.randn(6, 2), torch.arange(6)
    assert isinstance(as_loader((x, y), batch_size=2, shuffle=True), InMemoryLoader)
    assert isinstance(as_loader(TensorDataset(x, y), batch_size=2, shuffle=False), InMemoryLoader)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return x[i], y[i]

    loader = as_loader(Pairs(), batch_size=4, shuffle=True, seed=0)
    assert isinstance(loader, DataLoader) and len(loader) == 2
    mine = DataLoader(Pairs(), batch_size=3)
    assert as_loader(mine, batch_size=2, shuffle=True) is mine


# The paper's parameter counts (Zhang et al., 2018, Table 1) for CIFAR-100.
PAPER_MODELS = [("resnet32", 0.46e6), ("mobilenet", 3.3e6), ("wrn28_10", 36.5e6)]


@pytest.mark.parametrize("arch, params", PAPER_MODELS)
def test_cifar_models_have_the_papers_size(arch, params):
    with torch.device("meta"):  # sizes only: no memory, no initialisation time
        model = build_model(arch, (3, 32, 32), 100)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(params, rel=0.05)


@pytest.mark.parametrize(
    "arch, options",
    [("resnet32", {}), ("mobilenet", {"width": 0.25}), ("wrn28_10", {"depth": 10, "width": 1})],
)
def test_cifar_models_forward_and_step(arch, options):
    torch.manual_seed(0)
    model = build_model(arch, (3, 32, 32), 100, **options)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    logits = model(x)
    assert logits.shape == (2, 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(logits, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    "arch, shape", [("mlp", (40,)), ("mlp", (1, 8, 8)), ("cnn1d", (40,)), ("cnn1d", (2, 64))]
)
def test_small_models(arch, shape):
    model = build_model(arch, shape, 7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize(
    "arch, shape, options, message",
    [
        ("vgg", (40,), {}, "unknown architecture 'vgg'"),
        ("mlp", (40,), {"widht": 3}, "mlp has no option 'widht'"),
        ("cnn1d", (3, 32, 32), {}, r"cnn1d: it takes sequences"),
        ("resnet32", (40,), {}, r"resnet32: it takes images"),
        ("resnet32", (3, 32, 32), {"depth": 30}, "depth 6n \\+ 2"),
    ],
)
def test_model_errors(arch, shape, options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(arch, shape, 10, **options)


def test_cifar_through_torchvision(monkeypatch, tmp_path):
    """The CIFAR path with a stand-in for torchvision (not installed in CI)."""
    import types

    import fastdml.data

    made = []

    class CIFAR100:
        def __init__(self, root, train, transform):
            if not (tmp_path / "cifar-100-python").exists():
                raise RuntimeError("Dataset not found or corrupted.")
            made.append((root, train, transform))

    transforms = types.SimpleNamespace(
        Compose=list,
        Normalize=lambda *a: "normalize",
        RandomCrop=lambda *a, **k: "crop",
        RandomHorizontalFlip=lambda: "flip",
        ToTensor=lambda: "tensor",
    )
    modules = {
        "torchvision.datasets": types.SimpleNamespace(CIFAR100=CIFAR100),
        "torchvision.transforms": transforms,
    }
    monkeypatch.setattr(fastdml.data, "require", lambda module, package: modules[module])
    with pytest.raises(UserError, match=r"CIFAR100\('.*', download=True\)"):
        load_dataset("cifar100", data_dir=tmp_path)
    (tmp_path / "cifar-100-python").mkdir()
    data = load_dataset("cifar100", data_dir=tmp_path)
    assert data.num_classes == 100 and data.input_shape == (3, 32, 32)
    assert [train for _, train, _ in made] == [True, False]
    assert made[0][2] == ["crop", "flip", "tensor", "normalize"]
    assert made[1][2] == ["tensor", "normalize"]
