"""The grouped per-peer optimizer: one foreach step equals K separate optimizers."""

import copy

import pytest
import torch
from torch import nn

from fastdml.cohort.optim import LRSchedule, clip_grad_norms_, make_optimizer, make_scheduler

PEER_OPTIONS = {
    "sgd": [
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        {"lr": 0.03, "momentum": 0.5, "weight_decay": 0.0, "nesterov": False},
        {"lr": 0.2, "momentum": 0.0, "weight_decay": 1e-3, "nesterov": False},
    ],
    "adam": [
        {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 1e-4},
        {"lr": 5e-4, "betas": (0.5, 0.9), "weight_decay": 0.0},
    ],
    "adamw": [
        {"lr": 1e-3, "weight_decay": 1e-2},
        {"lr": 2e-3, "weight_decay": 0.0},
        {"lr": 1e-2, "weight_decay": 5e-2},
    ],
}
CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_peers():
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)),
        nn.Sequential(nn.Linear(6, 4)),
        nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)),
    ]


def fake_grads(peers, step):
    gen = torch.Generator().manual_seed(step)
    for peer in peers:
        for p in peer.parameters():
            p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("name", sorted(PEER_OPTIONS))
def test_grouped_step_equals_separate_optimizers(name):
    grouped_peers, separate_peers = make_peers(), make_peers()
    grouped = make_optimizer(name, grouped_peers, peer_options=PEER_OPTIONS[name])
    assert len(grouped.param_groups) == 3 and grouped.defaults["foreach"]
    assert [g["peer"] for g in grouped.param_groups] == [0, 1, 2]
    separate = [
        CLASSES[name](peer.parameters(), foreach=False, **options)
        for peer, options in zip(separate_peers, PEER_OPTIONS[name], strict=True)
    ]
    for step in range(5):
        fake_grads(grouped_peers, step)
        fake_grads(separate_peers, step)
        grouped.step()
        for opt in separate:
            opt.step()
    for a, b in zip(grouped_peers, separate_peers, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_group_without_gradients_does_not_move():
    """The alternating update relies on this: only the stepped peer has gradients."""
    peers = make_peers()
    opt = make_optimizer("sgd", peers)
    before = copy.deepcopy(peers)
    fake_grads(peers[1:2], 0)
    opt.step()
    unchanged = zip(peers[0].parameters(), before[0].parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in unchanged)
    assert not torch.equal(peers[1][0].weight, before[1][0].weight)


def test_named_optimizer_defaults_and_overrides():
    opt = make_optimizer("sgd", make_peers(), options={"lr": 0.5})
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.5, 0.9, True)
    fused = make_optimizer("adamw", make_peers(), options={"fused": True})
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    factory = make_optimizer(torch.optim.RMSprop, make_peers(), options={"lr": 0.01})
    assert isinstance(factory, torch.optim.RMSprop) and len(factory.param_groups) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(optimizer="lbfgs"), "optimizer must be one of"),
        (dict(optimizer="sgd", peer_options=[{}]), "one mapping per peer"),
    ],
)
def test_make_optimizer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(peers=make_peers(), **kwargs)


def test_clip_per_peer_equals_clip_grad_norm():
    peers, reference = make_peers(), make_peers()
    opt = make_optimizer("sgd", peers)
    fake_grads(peers, 1)
    fake_grads(reference, 1)
    max_norms = [0.5, None, 100.0]
    norms = clip_grad_norms_(opt, max_norms)
    for k, (peer, max_norm) in enumerate(zip(reference, max_norms, strict=True)):
        expected = torch.nn.utils.clip_grad_norm_(peer.parameters(), max_norm or float("inf"))
        torch.testing.assert_close(norms[k], expected)
        for p, q in zip(peers[k].parameters(), peer.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="one entry per param group"):
        clip_grad_norms_(opt, [1.0])


def test_clip_skips_a_group_without_gradients():
    peers = make_peers()
    opt = make_optimizer("sgd", peers)
    fake_grads(peers[:1], 0)
    norms = clip_grad_norms_(opt, [1.0, 1.0, 1.0])
    assert norms[0] > 1.0 and norms[1] == 0 and norms[2] == 0
    clipped = torch.cat([p.grad.flatten() for p in peers[0].parameters()])
    assert torch.linalg.vector_norm(clipped) == pytest.approx(1.0, rel=1e-5)


def test_lr_schedules():
    assert LRSchedule()(7) == 1.0
    cosine = LRSchedule("cosine", epochs=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0)
    step = LRSchedule("multistep", epochs=200, milestones=(60, 120), gamma=0.1)
    assert [step(e) for e in (0, 59, 60, 119, 120)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        LRSchedule("linear")


def test_scheduler_per_peer_and_state_round_trip():
    opt = make_optimizer("sgd", make_peers(), peer_options=[{"lr": 1.0}, {"lr": 2.0}, {"lr": 4.0}])
    schedules = [LRSchedule("cosine", epochs=4), None, LRSchedule("multistep", milestones=(1,))]
    scheduler = make_scheduler(opt, schedules)
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0 * 0.8535534, 2.0, 0.4])
    state = scheduler.state_dict()
    fresh = make_scheduler(make_optimizer("sgd", make_peers()), [LRSchedule() for _ in "abc"])
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0] == schedules[0] and fresh.last_epoch == 1
    with pytest.raises(ValueError, match="one callable or one per trainable peer"):
        make_scheduler(opt, [None])
