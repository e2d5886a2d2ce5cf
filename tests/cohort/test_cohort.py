"""The cohort's updates against hand-written loops, its evaluation, state and argument checks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdml import MutualLoss, mutual_loss
from fastdml.cohort.cohort import Cohort
from fastdml.models import build_model

CLASSES, FEATURES, N = 5, 12, 16


def peers(k=2, seed=0, batchnorm=False):
    torch.manual_seed(seed)
    made = []
    for i in range(k):
        layers = [nn.Linear(FEATURES, 8 + 4 * i), nn.ReLU(), nn.Linear(8 + 4 * i, CLASSES)]
        if batchnorm:
            layers.insert(1, nn.BatchNorm1d(8 + 4 * i))
        made.append(nn.Sequential(*layers))
    return made


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(N, FEATURES, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen))
        for _ in range(steps)
    ]


OPTIONS = [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0},
]


def separate_optimizers(models):
    return [
        torch.optim.SGD(m.parameters(), foreach=False, **{"nesterov": True, **o})
        for m, o in zip(models, OPTIONS, strict=True)
    ]


def assert_same_parameters(a, b, **tolerance):
    for p, q in zip(
        (p for m in a for p in m.parameters()), (q for m in b for q in m.parameters()), strict=True
    ):
        torch.testing.assert_close(p, q, **tolerance)


@pytest.mark.parametrize(
    "criterion",
    [MutualLoss(), MutualLoss(mode="ensemble", temperature=2.0), MutualLoss(alpha=0.0)],
    ids=["dml", "dml_e-T2", "independent"],
)
def test_simultaneous_step_equals_hand_written_loop(criterion):
    cohort = Cohort(peers(), criterion, peer_options=OPTIONS, device="cpu")
    models = peers()
    optimizers = separate_optimizers(models)
    for x, y in batches(4):
        out = cohort.train_step(x, y)
        logits = [m(x) for m in models]
        loss = criterion(logits, y)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    assert_same_parameters(cohort.peers, models)
    expected = mutual_loss(logits, y, return_components=True, **_options(criterion))
    torch.testing.assert_close(out.ce, expected.ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.mimicry, expected.mimicry, rtol=1e-4, atol=1e-5)
    assert out.correct.tolist() == [int((z.argmax(1) == y).sum()) for z in logits]
    assert int(out.count) == N


def _options(criterion):
    return dict(temperature=criterion.temperature, alpha=criterion.alpha, mode=criterion.mode)


def test_alternating_step_is_algorithm_1():
    """Each peer in turn steps on its own loss against the others' current predictions."""
    cohort = Cohort(peers(3), peer_options=OPTIONS + [{"lr": 0.2}], update="alternating")
    models = peers(3)
    optimizers = separate_optimizers(models[:2]) + [
        torch.optim.SGD(
            models[2].parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    ]
    for x, y in batches(3):
        cohort.train_step(x, y)
        for k, opt in enumerate(optimizers):
            logits = [m(x) if j == k else m(x).detach() for j, m in enumerate(models)]
            loss = mutual_loss(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert_same_parameters(cohort.peers, models)
    simultaneous = Cohort(peers(3), peer_options=OPTIONS + [{"lr": 0.2}])
    for x, y in batches(3):
        simultaneous.train_step(x, y)
    assert not torch.equal(simultaneous.peers[1][0].weight, cohort.peers[1][0].weight)


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
def test_frozen_teacher_is_never_stepped(update):
    student, teacher = peers(2, batchnorm=True)
    frozen_copy = copy.deepcopy(teacher)
    reference = copy.deepcopy(student)
    cohort = Cohort(
        [student, teacher], MutualLoss(peer_weights=[[0, 1], [0, 0]]), frozen=[1], update=update
    )
    assert len(cohort.optimizer.param_groups) == 1 and cohort.trainable == [0]
    cohort.train()
    assert student.training and not teacher.training
    opt = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    frozen_copy.eval()
    for x, y in batches(3):
        cohort.train_step(x, y)
        with torch.no_grad():
            target = frozen_copy(x).softmax(1)
        z = reference(x)
        kl = F.kl_div(z.log_softmax(1), target, reduction="batchmean")
        loss = F.cross_entropy(z, y) + kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same_parameters([teacher], [frozen_copy], rtol=0, atol=0)
    assert torch.equal(teacher[1].running_mean, frozen_copy[1].running_mean)
    assert_same_parameters([student], [reference], rtol=1e-5, atol=1e-6)


def test_single_peer_trains_on_cross_entropy():
    (model,) = peers(1)
    reference = copy.deepcopy(model)
    cohort = Cohort([model], MutualLoss(label_smoothing=0.1), optimizer="adam")
    opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    for x, y in batches(3):
        out = cohort.train_step(x, y)
        loss = F.cross_entropy(reference(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same_parameters([model], [reference])
    assert out.mimicry.tolist() == [0.0] and out.ce.shape == (1,)


def test_a_single_peer_with_every_target_ignored_takes_a_loss_of_zero():
    """Not F.cross_entropy's NaN mean over no rows (a data-parallel replica's shard may count
    none), which would spread to every parameter."""
    (model,) = peers(1)
    cohort = Cohort([model], optimizer="sgd", peer_options=[{"weight_decay": 0.0}])
    before = copy.deepcopy(model)
    x, y = batches(1)[0]
    out = cohort.train_step(x, torch.full_like(y, -100))
    assert out.ce.tolist() == [0.0] and out.count.item() == 0
    assert_same_parameters([model], [before], rtol=0, atol=0)


def test_heterogeneous_cohort_in_bfloat16():
    torch.manual_seed(0)
    models = [build_model("mlp", (40,), 10, hidden=32), build_model("cnn1d", (40,), 10)]
    before = copy.deepcopy(models)
    cohort = Cohort(models, precision="bf16", clip_norm=[1.0, None])
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    out = cohort.train_step(x, y)
    assert torch.isfinite(out.ce).all() and torch.isfinite(out.mimicry).all()
    for new, old in zip(models, before, strict=True):
        assert not torch.equal(next(new.parameters()), next(old.parameters()))
    result = cohort.evaluate([(x, y)])
    assert len(result.accuracy) == 2 and math.isfinite(result.ensemble_loss)


def test_compiled_peers_match_eager():
    x, y = batches(1)[0]
    eager = Cohort(peers())
    compiled = Cohort(peers(), compile={"backend": "aot_eager"})
    for cohort in (eager, compiled):
        cohort.train_step(x, y)
    assert_same_parameters(eager.peers, compiled.peers, rtol=1e-5, atol=1e-6)


def test_evaluate_matches_direct_computation():
    cohort = Cohort(peers(3), MutualLoss(peer_weights=torch.ones(3, 3) - torch.eye(3)), frozen=[2])
    data = batches(3, seed=5)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        probs = [m(x).softmax(1) for m in cohort.peers]
    result = cohort.evaluate(data)
    for k, p in enumerate(probs):
        assert result.loss[k] == pytest.approx(F.nll_loss(p.log(), y).item(), rel=1e-5)
        assert result.accuracy[k] == pytest.approx(100 * (p.argmax(1) == y).float().mean().item())
        entropy = -(p * p.log()).sum(1).mean().item()
        assert result.entropy[k] == pytest.approx(entropy, rel=1e-5)
    ensemble = (probs[0] + probs[1]) / 2  # the frozen teacher, peer 2, is left out
    assert result.ensemble_accuracy == pytest.approx(
        100 * (ensemble.argmax(1) == y).float().mean().item()
    )
    assert result.ensemble_loss == pytest.approx(F.nll_loss(ensemble.log(), y).item(), rel=1e-5)
    record = result.record("val")
    assert record["val_acc/peer2"] == result.accuracy[2]
    assert record["val_entropy/ensemble"] == result.ensemble_entropy
    assert all(m.training for m in cohort.peers[:2]) and not cohort.peers[2].training


def test_state_dict_round_trip_continues_identically():
    data = batches(4)
    a = Cohort(peers(), lr_schedule=lambda epoch: 0.5**epoch)
    for x, y in data[:2]:
        a.train_step(x, y)
    a.end_epoch()
    b = Cohort(peers(seed=9), lr_schedule=lambda epoch: 0.5**epoch)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    for x, y in data[2:]:
        a.train_step(x, y)
        b.train_step(x, y)
    assert_same_parameters(a.peers, b.peers, rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds 2 peers"):
        Cohort(peers(3)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="scheduler"):
        Cohort(peers()).load_state_dict(a.state_dict())


def test_spatial_logits():
    """Peers may predict per position, as F.cross_entropy allows: [N, C, L] with target [N, L]."""

    class PerPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, CLASSES, 1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    cohort = Cohort([PerPosition(), PerPosition()])
    x, y = torch.randn(4, 3, 7), torch.randint(0, CLASSES, (4, 7))
    y[0, :3] = -100
    out = cohort.train_step(x, y)
    assert int(out.count) == 25 and out.correct.shape == (2,)
    result = cohort.evaluate([(x, y)])
    assert 0 <= result.ensemble_accuracy <= 100


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((), {}, TypeError, "non-empty sequence"),
        (("same",), {}, ValueError, "distinct"),
        ((), {"frozen": [0, 1]}, ValueError, "at least one peer"),
        ((), {"frozen": [2]}, ValueError, "frozen must index"),
        ((), {"update": "round_robin"}, ValueError, "update must be one of"),
        ((), {"precision": "fp8"}, ValueError, "precision must be one of"),
        ((), {"precision": "fp16", "device": "cpu"}, ValueError, "needs a CUDA device"),
        ((MutualLoss(reduction="sum"),), {}, ValueError, "reduction='mean'"),
        ((MutualLoss(peer_weights=torch.zeros(3, 3)),), {}, ValueError, r"\(3, 3\)"),
        ((nn.CrossEntropyLoss(),), {}, TypeError, "fastdml.MutualLoss"),
        ((), {"clip_norm": [1.0]}, ValueError, "clip_norm must be one value"),
    ],
)
def test_argument_errors(args, kwargs, error, message):
    models = peers()
    if args == ("same",):
        models, args = [models[0], models[0]], ()
    with pytest.raises(error, match=message):
        Cohort([] if message == "non-empty sequence" else models, *args, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float16_with_grad_scaler_on_cuda():
    cohort = Cohort(peers(), precision="fp16", device="cuda", clip_norm=1.0)
    assert cohort.scaler is not None
    for x, y in batches(3):
        out = cohort.train_step(x, y)
    assert torch.isfinite(out.ce).all()
    state = cohort.state_dict()
    assert state["scaler"]["scale"] > 0
