"""The native ops as PyTorch custom ops: opcheck, torch.compile, determinism, extreme shapes."""

import pytest
import torch
from torch import nn

from fastdml import MutualLoss, mutual_loss
from fastdml.arguments import make_problem
from fastdml.ops import forward_arguments

NATIVE_BACKENDS = ["cpp"]
MODES = ["pairwise", "ensemble", "ensemble_logits", "weights"]


def op_args(k=3, n=6, c=11, dtype=torch.float64, mode="pairwise", temperature=2.0):
    logits = torch.randn(k, n, c, dtype=dtype)
    target = torch.randint(0, c, (n,))
    target[1] = -100
    weights = torch.rand(k, k).tolist() if mode == "weights" else None
    problem = make_problem(
        logits,
        target,
        temperature=temperature,
        mode="pairwise" if weights else mode,
        peer_weights=weights,
        label_smoothing=0.1,
        ignore_index=-100,
    )
    return forward_arguments(problem)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_forward(mode, dtype):
    args = op_args(mode=mode, dtype=dtype)
    args[0].requires_grad_()
    torch.library.opcheck(torch.ops.fastdml.mutual_loss_forward.default, args)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_backward(mode):
    args = op_args(mode=mode)
    logits, target, weights, *options = args
    _, _, stats = torch.ops.fastdml.mutual_loss_forward(*args)
    grad_ce, grad_mimicry = torch.rand(2, *logits.shape[:2], dtype=logits.dtype)
    torch.library.opcheck(
        torch.ops.fastdml.mutual_loss_backward.default,
        (grad_ce, grad_mimicry, logits, target, weights, stats, *options),
    )


def test_logits_are_not_written():
    args = op_args(dtype=torch.float32)
    before = args[0].clone()
    args[0].requires_grad_()
    ce, mimicry, _ = torch.ops.fastdml.mutual_loss_forward(*args)
    (ce.sum() + mimicry.sum()).backward()
    assert torch.equal(args[0].detach(), before)


class Cohort(nn.Module):
    """K linear peers on the same input, their logits stacked."""

    def __init__(self, k: int, features: int, classes: int) -> None:
        super().__init__()
        self.peers = nn.ModuleList(nn.Linear(features, classes) for _ in range(k))

    def forward(self, x):
        return torch.stack([peer(x) for peer in self.peers])


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("mode", ["pairwise", "ensemble_logits"])
def test_compile_fullgraph(backend, mode):
    torch._dynamo.reset()
    model = Cohort(3, 8, 10)
    criterion = MutualLoss(temperature=2.0, label_smoothing=0.1, mode=mode, backend=backend)
    x, y = torch.randn(16, 8), torch.randint(0, 10, (16,))
    y[3] = -100

    def step(x, y):
        return criterion(model(x), y)

    expected = step(x, y)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = torch.compile(step, fullgraph=True)(x, y)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for p, g in zip(model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_compile_follows_changing_options(backend):
    """Annealed temperature and alpha, and dynamic shapes, stay in one graph without breaks."""
    torch._dynamo.reset()
    criterion = MutualLoss(backend=backend)
    compiled = torch.compile(criterion, fullgraph=True, dynamic=True)
    for step, n in enumerate([8, 12, 16]):
        criterion.temperature, criterion.alpha = 1.0 + step, 0.5 * step
        logits, target = torch.randn(2, n, 10), torch.randint(0, 10, (n,))
        torch.testing.assert_close(compiled(logits, target), criterion(logits, target))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_deterministic(backend):
    threads = torch.get_num_threads()
    logits = torch.randn(4, 300, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (300,))

    def run(num_threads):
        torch.set_num_threads(num_threads)
        logits.grad = None
        loss = mutual_loss(logits, target, temperature=2.0, backend=backend, reduction="none")
        loss.sum().backward()
        return loss.detach(), logits.grad.clone()

    try:
        first, again, single = run(2), run(2), run(1)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_very_many_classes(backend, mode):
    k, c = 3, 262144
    logits = 4 * torch.randn(k, 3, c)
    target = torch.tensor([0, c - 1, 7])
    weights = dict(peer_weights=torch.rand(k, k)) if mode == "weights" else dict(mode=mode)
    results = []
    for name in ["torch", backend]:
        z = logits.clone().requires_grad_()
        out = mutual_loss(
            z, target, temperature=2.0, return_components=True, backend=name, **weights
        )
        out.loss.backward()
        results.append((*out, z.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    """Offsets past 2**31 elements: the last rows must come out like the first ones."""
    k, n, c = 2, 16385, 65537  # 2 * 16385 * 65537 > 2**31
    assert k * n * c > 2**31
    logits = torch.zeros(k, n, c, dtype=torch.float16)
    probe = torch.randn(k, 2, c).half()
    logits[:, :2], logits[:, -2:] = probe, probe
    target = torch.zeros(n, dtype=torch.long)
    target[-2:] = target[:2] = torch.tensor([3, c - 1])
    logits.requires_grad_()
    loss = mutual_loss(logits, target, reduction="none", backend=backend)
    torch.testing.assert_close(loss[:, -2:], loss[:, :2], rtol=0, atol=0)
    grad_out = torch.zeros_like(loss)
    grad_out[:, :2] = grad_out[:, -2:] = 1
    loss.backward(grad_out)
    assert torch.equal(logits.grad[:, -2:], logits.grad[:, :2])
    expected = mutual_loss(probe.float(), target[:2], reduction="none", backend="torch")
    torch.testing.assert_close(loss[:, :2], expected, rtol=1e-4, atol=1e-5)
