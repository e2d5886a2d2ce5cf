"""The stacked optimizer: one step over [K, ...] parameters equals torch's optimizer per peer."""

import copy

import pytest
import torch

from fastdml.cohort.optim import clip_grad_norms_, make_optimizer
from fastdml.models import MLP
from fastdml.stacked import optim as stacked_optim
from fastdml.stacked.layers import stack_peers
from fastdml.stacked.optim import StackedOptimizer, clip_stacked_grad_norms_

PEER_OPTIONS = {
    "sgd": [
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        {"lr": 0.03, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.0, "nesterov": False},
        {"lr": 0.2, "momentum": 0.0, "weight_decay": 1e-3, "nesterov": False},
    ],
    "adam": [
        {"lr": 2e-3, "betas": (0.9, 0.999)},
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 1e-4, "eps": 1e-6},
        {"lr": 5e-4, "betas": (0.5, 0.9), "eps": 1e-3},
    ],
    "adamw": [
        {"lr": 1e-3, "weight_decay": 1e-2, "betas": (0.7, 0.9)},
        {"lr": 2e-3, "weight_decay": 0.0},
        {"lr": 1e-2, "weight_decay": 5e-2, "eps": 1e-4},
    ],
}
CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_peers(k=3):
    torch.manual_seed(0)
    return [MLP(6, 4, hidden=8) for _ in range(k)]


def fake_grads(peers, stacked, step):
    gen = torch.Generator().manual_seed(step)
    for peer in peers:
        for p in peer.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
    for name, p in stacked.named_parameters():
        p.grad = torch.stack([dict(peer.named_parameters())[name].grad for peer in peers])


def assert_same_weights(stacked_peers, peers, rtol=1e-6, atol=1e-7):
    for a, b in zip(stacked_peers, peers, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "shared", [None, 0, 1, 2], ids=["per-peer", "shared0", "shared1", "shared2"]
)
@pytest.mark.parametrize("name", sorted(PEER_OPTIONS))
def test_step_equals_torch_per_peer(name, shared, monkeypatch):
    """Shared options take torch's fused kernels, per-peer ones the foreach operations."""
    options = PEER_OPTIONS[name] if shared is None else [PEER_OPTIONS[name][shared]] * 3
    foreach_steps, foreach_step = [], getattr(stacked_optim, "_sgd" if name == "sgd" else "_adam")
    monkeypatch.setattr(
        stacked_optim,
        foreach_step.__name__,
        lambda *args: foreach_steps.append(foreach_step(*args)),
    )
    stacked_peers, peers = make_peers(), make_peers()
    model = stack_peers(stacked_peers)
    optimizer = StackedOptimizer(model, name, peer_options=options)
    separate = [
        CLASSES[name](peer.parameters(), foreach=False, **o)
        for peer, o in zip(peers, options, strict=True)
    ]
    for step in range(5):
        fake_grads(peers, model, step)
        optimizer.step()
        for opt in separate:
            opt.step()
    assert_same_weights(stacked_peers, peers)
    assert len(foreach_steps) == (5 if shared is None else 0)


@pytest.mark.parametrize("name", sorted(PEER_OPTIONS))
def test_state_dict_is_torchs_over_the_separate_peers(name):
    """A checkpoint of either kind of cohort resumes the other."""
    stacked_peers, peers = make_peers(), make_peers()
    model = stack_peers(stacked_peers)
    optimizer = StackedOptimizer(model, name, peer_options=PEER_OPTIONS[name])
    grouped = make_optimizer(name, peers, peer_options=PEER_OPTIONS[name])
    for step in range(2):
        fake_grads(peers, model, step)
        optimizer.step()
        grouped.step()
    mine, torchs = optimizer.state_dict(), grouped.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for i, entry in torchs["state"].items():
        assert mine["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(mine["state"][i][key], value, rtol=1e-6, atol=1e-7)

    # each resumes from the other's state and goes on as it would have
    resumed_peers = make_peers()
    resumed_model = stack_peers(resumed_peers)
    resumed = StackedOptimizer(resumed_model, name)
    for a, b in zip(resumed_peers, peers, strict=True):
        a.load_state_dict(b.state_dict())
    resumed.load_state_dict(torchs)
    grouped_again = make_optimizer(name, copy.deepcopy(peers))
    grouped_again.load_state_dict(mine)
    assert grouped_again.state_dict()["param_groups"] == torchs["param_groups"]
    for step in range(2, 4):
        fake_grads(peers, resumed_model, step)
        resumed.step()
        grouped.step()
    assert_same_weights(resumed_peers, peers)


def test_step_of_one_peer_leaves_the_others():
    """The alternating update steps each peer's slices alone."""
    stacked_peers = make_peers()
    model = stack_peers(stacked_peers)
    optimizer = StackedOptimizer(model, "adam")
    before = copy.deepcopy(model.state_dict())
    fake_grads(make_peers(), model, 0)
    optimizer.step(peer=1)
    for name, p in model.named_parameters():
        assert torch.equal(p[0], before[name][0]) and torch.equal(p[2], before[name][2])
        assert not torch.equal(p[1], before[name][1])
        state = optimizer.state[p]
        assert not state["exp_avg"][0].any() and state["exp_avg"][1].any()
    assert optimizer.steps == [0, 1, 0]
    assert list(optimizer.state_dict()["state"]) == list(range(6, 12))


def test_clipping_per_peer_equals_clipping_per_group():
    stacked_peers, peers = make_peers(), make_peers()
    model = stack_peers(stacked_peers)
    grouped = make_optimizer("sgd", peers)
    fake_grads(peers, model, 0)
    bounds = [0.5, None, 100.0]
    norms = clip_stacked_grad_norms_(list(model.parameters()), bounds)
    torch.testing.assert_close(norms, clip_grad_norms_(grouped, bounds))
    for name, p in model.named_parameters():
        for k, peer in enumerate(peers):
            torch.testing.assert_close(p.grad[k], dict(peer.named_parameters())[name].grad)


def test_refusals_name_the_optimizer_and_option():
    model = stack_peers(make_peers())
    with pytest.raises(TypeError, match="factory .*RMSprop"):
        StackedOptimizer(model, torch.optim.RMSprop)
    with pytest.raises(ValueError, match="amsgrad=True of adam"):
        StackedOptimizer(model, "adam", options={"amsgrad": True})
    with pytest.raises(ValueError, match="maximize=True of sgd"):
        StackedOptimizer(model, "sgd", peer_options=[{}, {"maximize": True}, {}])
    with pytest.raises(ValueError, match="one mapping per peer"):
        StackedOptimizer(model, "sgd", peer_options=[{}])
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch's own check
        StackedOptimizer(model, "sgd", peer_options=[{}, {"lr": -1.0}, {}])
    with pytest.raises(ValueError, match="one of"):
        StackedOptimizer(model, "lamb")
