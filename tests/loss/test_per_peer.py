"""per_peer=True: each peer's loss as a graph of its own, for loops that step one peer at a time.

Each loss backpropagates alone, in any order, with no retain_graph, into its own peer only, and
gives the gradient of that peer's own loss with the other peers held fixed."""

import pytest
import torch
from conftest import skip_if_unsupported
from test_linear_loss import layers
from test_mutual_loss import make_inputs

from fastdml import FusedLinearMutualLoss, MutualLoss, fused_linear_mutual_loss, mutual_loss

ORDERS = [pytest.param((0, 1, 2), id="forward"), pytest.param((2, 1, 0), id="reverse")]
OPTIONS = [
    pytest.param(dict(temperature=2.0), id="T2"),
    pytest.param(dict(mode="ensemble", label_smoothing=0.1), id="ensemble"),
    pytest.param(dict(peer_weights=[[0, 1, 0.5], [1, 0, 0], [0.3, 0.7, 0]]), id="weights"),
]


def own_loss(logits, target, k, **options):
    """Peer k's loss with the other peers' logits held fixed: its value from the components, and
    a loss whose gradient in z_k is its own (every mimicry target is a constant)."""
    peers = [z if j == k else z.detach() for j, z in enumerate(logits)]
    out = mutual_loss(peers, target, return_components=True, **options)
    if options.get("reduction") == "none":
        return out.loss[k].detach(), out.loss[k]
    factor = options.get("alpha", 1.0) * options.get("temperature", 1.0) ** 2
    value = options.get("ce_weight", 1.0) * out.ce[k] + factor * out.mimicry[k]
    return value, out.loss


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_each_peer_gets_its_own_gradient(backend, options, reduction, order):
    logits, target = make_inputs(3, 8, 11)
    peers = [z.clone().requires_grad_() for z in logits]
    losses = mutual_loss(
        peers, target, per_peer=True, backend=backend, reduction=reduction, **options
    )
    assert isinstance(losses, tuple) and len(losses) == 3
    for k in order:
        upstream = torch.rand_like(losses[k])
        losses[k].backward(upstream)  # no retain_graph
        done = order[: order.index(k) + 1]
        assert all((peers[j].grad is not None) == (j in done) for j in range(3))
        exact = [z.clone().requires_grad_() for z in logits]
        value, own = own_loss(exact, target, k, backend="torch", reduction=reduction, **options)
        (grad,) = torch.autograd.grad(own, exact[k], upstream)
        torch.testing.assert_close(peers[k].grad, grad)
        torch.testing.assert_close(losses[k].detach(), value)


def test_other_peers_receive_nothing(backend):
    logits, target = make_inputs(3, 6, 7)
    peers = [z.clone().requires_grad_() for z in logits]
    losses = mutual_loss(peers, target, per_peer=True, backend=backend)
    losses[1].backward()
    assert peers[0].grad is None and peers[2].grad is None and peers[1].grad is not None


def test_losses_add_up_to_the_cohort_loss(backend):
    logits, target = make_inputs(3, 8, 11)
    kwargs = dict(backend=backend, temperature=2.0, alpha=0.5)
    out = mutual_loss(list(logits), target, per_peer=True, return_components=True, **kwargs)
    cohort = mutual_loss(list(logits), target, return_components=True, **kwargs)
    torch.testing.assert_close(sum(out.loss), cohort.loss)
    torch.testing.assert_close(out.ce, cohort.ce)
    torch.testing.assert_close(out.mimicry, cohort.mimicry)


@pytest.mark.parametrize("options", [dict(divergence="jsd", beta=0.3), dict(ce_weight=0.0)])
def test_extended_options(options):
    logits, target = make_inputs(3, 8, 11)
    peers = [z.clone().requires_grad_() for z in logits]
    losses = mutual_loss(peers, target, per_peer=True, mimic_unlabeled=True, **options)
    for k in (2, 0):
        losses[k].backward()
        exact = [z.clone().requires_grad_() for z in logits]
        _, own = own_loss(exact, target, k, backend="torch", mimic_unlabeled=True, **options)
        torch.testing.assert_close(peers[k].grad, torch.autograd.grad(own, exact[k])[0])


def test_the_papers_loop_steps_one_peer_at_a_time():
    """Algorithm 1 with one fused call: the peers step in turn on the same losses, and each step
    equals that of the peer's own loss."""
    torch.manual_seed(0)
    nets = [torch.nn.Linear(5, 7) for _ in range(3)]
    twins = [torch.nn.Linear(5, 7) for _ in range(3)]
    for net, twin in zip(nets, twins, strict=True):
        twin.load_state_dict(net.state_dict())
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]
    x, y = torch.randn(16, 5), torch.randint(0, 7, (16,))
    criterion = MutualLoss(temperature=2.0, per_peer=True)
    losses = criterion([net(x) for net in nets], y)
    for loss, opt in zip(losses, opts, strict=True):
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits = [twin(x) for twin in twins]
    for k, twin in enumerate(twins):
        _, own = own_loss(logits, y, k, temperature=2.0)
        for param, grad in zip(
            twin.parameters(), torch.autograd.grad(own, list(twin.parameters())), strict=True
        ):
            param.data -= 0.1 * grad
    for net, twin in zip(nets, twins, strict=True):
        for got, want in zip(net.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(got, want)


def test_float16_gradient_under_loss_scaling(backend):
    """The gradient is kept in float32 until the upstream (loss-scaled) gradient multiplies it."""
    skip_if_unsupported(backend, torch.float16)
    logits, target = make_inputs(2, 64, 50, dtype=torch.float16, ignore_every=0, scale=4.0)
    peers = [z.clone().requires_grad_() for z in logits]
    losses = mutual_loss(peers, target, per_peer=True, backend=backend)
    (65536.0 * losses[0]).backward()
    exact = [z.double().requires_grad_() for z in logits]
    _, own = own_loss(exact, target, 0, backend="torch")
    expected = (65536.0 * torch.autograd.grad(own, exact[0])[0]).to(torch.float16)
    assert peers[0].grad.dtype == torch.float16
    assert int(((peers[0].grad == 0) & (expected != 0)).sum()) == 0
    torch.testing.assert_close(peers[0].grad, expected, rtol=2e-3, atol=1e-2)


def test_without_grad_the_losses_are_plain():
    logits, target = make_inputs(2, 6, 7)
    with torch.no_grad():
        losses = mutual_loss([z.requires_grad_() for z in logits.clone()], target, per_peer=True)
    assert all(loss.grad_fn is None for loss in losses)
    torch.testing.assert_close(sum(losses), mutual_loss(logits, target))


def test_a_frozen_peer_needs_no_gradient():
    logits, target = make_inputs(2, 6, 7)
    student = logits[0].clone().requires_grad_()
    losses = mutual_loss([student, logits[1]], target, per_peer=True)
    losses[0].backward()
    assert student.grad is not None and losses[1].grad_fn is None


def test_a_stacked_leaf_is_split_and_a_stacked_graph_refused():
    logits, target = make_inputs(2, 6, 7)
    leaf = logits.clone().requires_grad_()
    losses = mutual_loss(leaf, target, per_peer=True)
    losses[1].backward()
    assert not leaf.grad[0].any() and leaf.grad[1].any()
    peers = [z.clone().requires_grad_() for z in logits]
    with pytest.raises(ValueError, match="list of K tensors.*StackBackward"):
        mutual_loss(torch.stack(peers), target, per_peer=True)
    with pytest.raises(TypeError, match="logits must be a list of K tensors"):
        mutual_loss(logits[0].numpy(), target, per_peer=True)


def test_call_overrides_the_constructor():
    logits, target = make_inputs(2, 6, 7)
    assert isinstance(MutualLoss(per_peer=True)(list(logits), target, per_peer=False), torch.Tensor)
    assert isinstance(MutualLoss()(list(logits), target, per_peer=True), tuple)


# ---------------------------------------------------------------------------------------------
# The fused linear loss


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [dict(temperature=2.0), dict(divergence="reverse_kl")])
def test_linear_each_peer_gets_its_own_gradients(options, reduction, order):
    hidden, weight, biases, target = layers((3, 4, 5))
    losses = fused_linear_mutual_loss(
        hidden, weight, target, biases, chunk_size=4, per_peer=True, reduction=reduction, **options
    )
    for k in order:
        losses[k].backward()
        mine = [p for p in (hidden[k], weight[k], biases[k]) if p is not None]
        logits = [
            torch.nn.functional.linear(h, w, b)
            for h, w, b in zip(hidden, weight, biases, strict=True)
        ]
        _, own = own_loss(logits, target, k, backend="torch", reduction=reduction, **options)
        for param, grad in zip(mine, torch.autograd.grad(own, mine), strict=True):
            torch.testing.assert_close(param.grad, grad)
        done = order[: order.index(k) + 1]
        assert all((weight[j].grad is not None) == (j in done) for j in range(3))


def test_linear_stacked_leaves_and_module():
    hidden, weight, _, target = layers((4, 4))
    stacked_h = torch.stack(hidden).detach().requires_grad_()
    stacked_w = torch.stack(weight).detach().requires_grad_()
    criterion = FusedLinearMutualLoss(temperature=2.0)
    losses = criterion(stacked_h, stacked_w, target, per_peer=True)
    losses[0].backward()
    assert stacked_w.grad[0].any() and not stacked_w.grad[1].any()
    torch.testing.assert_close(
        sum(losses).detach(), criterion(stacked_h, stacked_w, target).detach()
    )


def test_linear_refusals():
    hidden, weight, biases, target = layers((3, 4))
    with pytest.raises(ValueError, match="per_peer=True needs reduction 'mean' or 'sum'"):
        fused_linear_mutual_loss(hidden, weight, target, per_peer=True, reduction="none")
    half = [h.detach().half().requires_grad_() for h in hidden]
    with pytest.raises(ValueError, match="got float16"):
        fused_linear_mutual_loss(half, [w.detach().half() for w in weight], target, per_peer=True)
    with pytest.raises(ValueError, match="list of K tensors.*StackBackward"):
        fused_linear_mutual_loss(
            torch.stack([h[:, :3] for h in hidden]), weight, target, per_peer=True
        )
