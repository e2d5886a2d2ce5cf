"""Stacked cohorts: K peers of one architecture as one batched model train as the unstacked
cohort does, and read and write the same checkpoints."""

import pytest
import torch
from torch import nn

from fastdml import Cohort, LRSchedule, StackedCohort, Trainer, stack_peers
from fastdml.cli.commands import main
from fastdml.models import build_model

SHAPES = {"mlp": (40,), "cnn1d": (40,), "resnet32": (3, 32, 32), "mobilenet": (3, 32, 32)}
SHAPES["wrn28_10"] = SHAPES["resnet32"]
SMALL = {
    "mlp": {"hidden": 32},
    "cnn1d": {"channels": 8, "batch_norm": True},
    "resnet32": {"depth": 8},
    "mobilenet": {"width": 0.125},
    "wrn28_10": {"depth": 10, "width": 1, "dropout": 0.3},
}


def make_peers(arch, k=3, dtype=torch.float32, **options):
    torch.manual_seed(0)
    options = {**SMALL[arch], **options}
    return [build_model(arch, SHAPES[arch], 10, **options).to(dtype) for _ in range(k)]


def batches(arch, steps, n=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (
            torch.randn(n, *SHAPES[arch], generator=gen, dtype=dtype),
            torch.randint(0, 10, (n,), generator=gen),
        )


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_stacked_model_computes_each_peer(arch, training):
    peers = make_peers(arch, dropout=0.0) if arch == "wrn28_10" else make_peers(arch)
    x = next(batches(arch, 1, n=4))[0]
    model = stack_peers(peers).train(training)
    z = model(x)
    assert z.shape == (3, 4, 10) and z.is_contiguous()  # straight into the fused loss
    expected = torch.stack([peer.train(training)(x) for peer in peers])
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    for k, peer in enumerate(peers):  # each peer holds views of its slices
        for name, tensor in model.state_dict().items():
            assert peer.state_dict()[name].data_ptr() == tensor[k].data_ptr()


def test_dropout_draws_differ_per_peer():
    peers = make_peers("wrn28_10", k=2, dropout=0.5)
    peers[1].load_state_dict(peers[0].state_dict())
    model = stack_peers(peers)
    x = next(batches("wrn28_10", 1, n=4))[0]
    z = model.eval()(x)
    torch.testing.assert_close(z[0], z[1])
    z = model.train()(x)
    assert not torch.allclose(z[0], z[1])


def assert_same_state(stacked, unstacked, rtol, atol, skip=()):
    for a, b in zip(stacked.peers, unstacked.peers, strict=True):
        for name, tensor in b.state_dict().items():
            if not any(s in name for s in skip):
                torch.testing.assert_close(a.state_dict()[name], tensor, rtol=rtol, atol=atol)


CASES = {
    "mlp-sgd-per-peer": (
        "mlp",
        {
            "peer_options": [
                {"lr": 0.1},
                {"lr": 0.05, "momentum": 0.5, "nesterov": False},
                {"lr": 0.02, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
            ],
            "clip_norm": [0.5, None, 1.0],
            "lr_schedule": [LRSchedule("cosine", epochs=3), None, LRSchedule("multistep", 3, (1,))],
        },
    ),
    "mlp-adam-per-peer": (
        "mlp",
        {
            "optimizer": "adam",
            "peer_options": [{"lr": 1e-3}, {"lr": 3e-3, "betas": (0.8, 0.99)}, {"lr": 1e-3}],
            "options": {"weight_decay": 1e-3},
            "clip_norm": 0.5,
        },
    ),
    "mlp-adamw-per-peer": (
        "mlp",
        {"optimizer": "adamw", "peer_options": [{"weight_decay": w} for w in (0.0, 0.01, 0.1)]},
    ),
    "mlp-alternating": ("mlp", {"update": "alternating", "optimizer": "adam"}),
    "mlp-alternating-sgd-clipped": ("mlp", {"update": "alternating", "clip_norm": 0.3}),
    "cnn1d-batch-norm": ("cnn1d", {"lr_schedule": LRSchedule("cosine", epochs=2)}),
    "cnn1d-batch-norm-alternating": ("cnn1d", {"update": "alternating"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trains_as_the_unstacked_cohort(case):
    arch, options = CASES[case]
    cohorts = [kind(make_peers(arch), device="cpu", **options) for kind in (StackedCohort, Cohort)]
    for cohort in cohorts:
        cohort.train()
        outputs = []
        for step, (x, y) in enumerate(batches(arch, 4)):
            outputs.append(cohort.train_step(x, y))
            if step % 2:
                cohort.end_epoch()
        cohort.outputs = outputs
    stacked, unstacked = cohorts
    # alternating: a batch norm's running statistics take one update a peer's turn when stacked
    skip = ("running", "num_batches") if options.get("update") == "alternating" else ()
    assert_same_state(stacked, unstacked, rtol=1e-4, atol=1e-5, skip=skip)
    for a, b in zip(stacked.outputs, unstacked.outputs, strict=True):
        torch.testing.assert_close(a.ce, b.ce, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.mimicry, b.mimicry, rtol=1e-4, atol=1e-5)
    assert [g["lr"] for g in stacked.optimizer.param_groups] == [
        g["lr"] for g in unstacked.optimizer.param_groups
    ]
    if arch == "cnn1d":  # each peer its own running statistics
        means = [peer.norms[0].running_mean for peer in stacked.peers]
        assert not torch.allclose(means[0], means[1])


def test_resnet32_trains_as_the_unstacked_cohort():
    """In float64 (in float32 the rounding of the grouped convolutions grows within steps), on
    8 x 8 images to be quick (the network pools whatever size is left at the end)."""
    cohorts = []
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=gen), torch.arange(4)) for _ in range(3)]
    for kind in (StackedCohort, Cohort):
        torch.manual_seed(0)
        peers = [build_model("resnet32", (3, 32, 32), 10).double() for _ in range(2)]
        cohort = kind(peers, device="cpu", optimizer="adamw", peer_options=[{}, {"lr": 2e-3}])
        for x, y in data:
            cohort.train_step(x.double(), y)
        cohorts.append(cohort)
    assert_same_state(*cohorts, rtol=1e-9, atol=1e-12)


def test_bf16_autocast():
    outputs = []
    for kind in (StackedCohort, Cohort):
        cohort = kind(make_peers("mlp"), precision="bf16", device="cpu")
        outputs.append([cohort.train_step(x, y).ce for x, y in batches("mlp", 2)])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_evaluation_is_the_unstacked_cohorts():
    stacked = StackedCohort(make_peers("cnn1d"), device="cpu")
    unstacked = Cohort(make_peers("cnn1d"), device="cpu")
    data = list(batches("cnn1d", 2))
    for cohort in (stacked, unstacked):
        cohort.train_step(*data[0])
    a, b = stacked.evaluate(data), unstacked.evaluate(data)
    assert a.accuracy == b.accuracy and a.ensemble_accuracy == b.ensemble_accuracy
    torch.testing.assert_close(torch.tensor(a.loss), torch.tensor(b.loss))
    assert stacked.model.training  # evaluation leaves the training mode as it was


@pytest.mark.parametrize("first", [StackedCohort, Cohort], ids=["from-stacked", "from-unstacked"])
def test_either_kind_resumes_either_kinds_checkpoint(tmp_path, first):
    second = Cohort if first is StackedCohort else StackedCohort
    data = next(batches("mlp", 1, n=96))
    options = {"device": "cpu", "lr_schedule": LRSchedule("cosine", epochs=2)}
    fit = {"epochs": 2, "batch_size": 32, "progress": False, "plots": False}
    straight = Cohort(make_peers("mlp"), **options)
    straight.fit(data, **fit)
    first(make_peers("mlp"), **options).fit(data, out=tmp_path, **{**fit, "epochs": 1})
    resumed = second(make_peers("mlp"), **options)
    trainer = Trainer(resumed, data, out=tmp_path, resume=True, **fit)
    trainer.run()
    assert [r["epoch"] for r in trainer.history] == [1, 2]
    assert_same_state(resumed, straight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        resumed.state_dict()["optimizer"]["state"][0]["momentum_buffer"],
        straight.state_dict()["optimizer"]["state"][0]["momentum_buffer"],
        rtol=1e-4,
        atol=1e-5,
    )


def test_refusals():
    mlp, cnn = make_peers("mlp", k=1)[0], make_peers("cnn1d", k=1)[0]
    with pytest.raises(ValueError, match="one architecture: peer 1 \\(CNN1d\\)"):
        StackedCohort([mlp, cnn], device="cpu")
    with pytest.raises(ValueError, match="one architecture"):  # same type, other widths
        StackedCohort([mlp, build_model("mlp", (40,), 10, hidden=16)], device="cpu")
    with pytest.raises(ValueError, match="frozen teacher cannot be stacked"):
        StackedCohort(make_peers("mlp", k=2), frozen=[1], device="cpu")
    with pytest.raises(ValueError, match="'fp32' or 'bf16'"):
        StackedCohort(make_peers("mlp", k=2), precision="fp16", device="cpu")
    with pytest.raises(TypeError, match="factory .*RMSprop"):
        StackedCohort(make_peers("mlp", k=2), optimizer=torch.optim.RMSprop, device="cpu")
    with pytest.raises(TypeError, match="cannot stack GELU"):
        stack_peers([nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(2)])
    with pytest.raises(ValueError, match="distinct"):
        stack_peers([mlp, mlp])


def test_command_line_resumes_unstacked(tmp_path, capsys):
    run = ["--peers", "mlp,mlp", "--train-samples", "64", "--batch-size", "32", "--no-progress"]
    run += ["--lr-schedule", "constant", "--device", "cpu", "--out", str(tmp_path / "a")]
    assert main(["train", *run, "--stacked", "--epochs", "1"]) == 0
    assert main(["train", *run, "--resume", "--epochs", "2"]) == 0
    assert main(["train", "--peers", "mlp,cnn1d", "--stacked", "--out", str(tmp_path / "b")]) == 2
    assert "stacked peers must share one architecture" in capsys.readouterr().err
