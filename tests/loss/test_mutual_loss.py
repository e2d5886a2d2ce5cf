"""Values and gradients of every backend against the naive float64 loop over pairs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import skip_if_unsupported
from naive import naive_mutual_loss

from fastdml import MutualLoss, mutual_loss

MODES = ["pairwise", "ensemble", "ensemble_logits", "weights"]
OPTIONS = [
    dict(temperature=1.0, alpha=1.0, label_smoothing=0.0),
    dict(temperature=3.0, alpha=0.5, label_smoothing=0.1),
    dict(temperature=0.5, alpha=0.0, label_smoothing=0.2),
]
TOLERANCES = {  # (rtol, atol) against float64, for values and gradients
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 2e-4),
    torch.bfloat16: (1e-2, 2e-3),
}


def make_inputs(k, n, c, *, dtype=torch.float64, spatial=(), ignore_every=4, scale=3.0):
    logits = (scale * torch.randn(k, n, c, *spatial, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, c, (n, *spatial))
    if ignore_every:
        target.view(-1)[::ignore_every] = -100
    return logits, target


def mode_kwargs(mode, k):
    if mode != "weights":
        return dict(mode=mode)
    return dict(peer_weights=torch.rand(k, k, dtype=torch.float64).tolist())


def check_against_naive(logits, target, backend, rtol=None, atol=None, **kwargs):
    """Loss, components and gradients of `backend` against the naive loop on the same input."""
    rtol, atol = TOLERANCES[logits.dtype] if rtol is None else (rtol, atol)
    ours = logits.detach().clone().requires_grad_()
    out = mutual_loss(ours, target, return_components=True, backend=backend, **kwargs)
    peers = [p.detach().double().requires_grad_() for p in logits]
    expected = naive_mutual_loss(peers, target, **kwargs)
    for got, want in zip(out, expected, strict=True):
        assert got.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    grad_out = torch.rand_like(expected[0])
    out.loss.backward(grad_out.to(out.loss.dtype))
    expected[0].backward(grad_out)
    assert ours.grad.dtype == logits.dtype
    torch.testing.assert_close(
        ours.grad.double(), torch.stack([p.grad for p in peers]), rtol=rtol, atol=atol
    )
    return out


@pytest.mark.parametrize("options", OPTIONS, ids=["T1", "T3-eps", "T0.5-alpha0"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_naive(backend, k, mode, reduction, options):
    logits, target = make_inputs(k, 11, 37)
    check_against_naive(
        logits, target, backend, reduction=reduction, **mode_kwargs(mode, k), **options
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [4, 6, 9])
def test_cohort_sizes(backend, k, mode):
    logits, target = make_inputs(k, 7, 19)
    check_against_naive(logits, target, backend, temperature=2.0, **mode_kwargs(mode, k))


@pytest.mark.parametrize("c", [2, 3, 1000, pytest.param(50000, marks=pytest.mark.slow)])
def test_class_counts(backend, c):
    logits, target = make_inputs(3, 5, c, ignore_every=0)
    check_against_naive(logits, target, backend, temperature=2.0, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_dtypes(backend, dtype, mode):
    skip_if_unsupported(backend, dtype)
    logits, target = make_inputs(3, 16, 100, dtype=dtype)
    check_against_naive(
        logits, target, backend, temperature=2.0, label_smoothing=0.1, **mode_kwargs(mode, 3)
    )


@pytest.mark.parametrize("mode", MODES)
def test_large_logits_are_stable(backend, mode):
    logits, target = make_inputs(3, 8, 50, scale=1e4)
    out = check_against_naive(logits, target, backend, **mode_kwargs(mode, 3))
    assert torch.isfinite(out.loss)
    f32 = logits.float()
    check_against_naive(f32, target, backend, rtol=1e-4, atol=1e-2, **mode_kwargs(mode, 3))


def test_spatial_logits(backend):
    logits, target = make_inputs(3, 4, 6, spatial=(5, 3), ignore_every=7)
    for reduction in ["mean", "sum", "none"]:
        out = check_against_naive(
            logits, target, backend, reduction=reduction, temperature=2.0, label_smoothing=0.1
        )
    assert out.loss.shape == (3, 4, 5, 3)


def test_list_and_stacked_inputs_agree(backend):
    logits, target = make_inputs(3, 9, 21)
    stacked = mutual_loss(logits, target, backend=backend, reduction="none")
    for container in (list, tuple):
        torch.testing.assert_close(
            mutual_loss(container(logits), target, backend=backend, reduction="none"), stacked
        )


def test_non_contiguous_logits(backend):
    k, n, c = 3, 10, 12
    transposed = torch.randn(k, c, n, dtype=torch.float64).transpose(1, 2)
    target = torch.randint(0, c, (n,))
    check_against_naive(transposed, target, backend)
    sliced = torch.randn(k, n, 2 * c, dtype=torch.float64)[:, :, ::2]
    check_against_naive(sliced, target, backend)
    peers = [torch.randn(c, n, dtype=torch.float64).t() for _ in range(k)]
    check_against_naive(torch.stack(peers), target, backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    logits = torch.randn(3, 6, 10, requires_grad=True)
    target = torch.full((6,), -1)
    loss = mutual_loss(logits, target, ignore_index=-1, reduction=reduction, backend=backend)
    assert not loss.any() and not loss.isnan().any()
    loss.sum().backward()
    assert not logits.grad.any() and not logits.grad.isnan().any()


def test_ignored_rows_are_skipped_entirely(backend):
    logits, target = make_inputs(3, 8, 10, ignore_every=0, dtype=torch.float32)
    target[2] = 5
    ignored = logits.clone()
    ignored[:, 2] = float("nan")
    ignored.requires_grad_()
    loss = mutual_loss(ignored, target, ignore_index=5, backend=backend)
    loss.backward()
    keep = torch.arange(8) != 2
    expected = mutual_loss(logits[:, keep], target[keep], ignore_index=5, backend=backend)
    torch.testing.assert_close(loss, expected)
    assert not ignored.grad[:, 2].any() and torch.isfinite(ignored.grad).all()


def test_nan_propagates(backend):
    logits, target = make_inputs(2, 4, 8, ignore_every=0, dtype=torch.float32)
    logits[1, 3, 2] = float("nan")
    per_row = mutual_loss(logits, target, reduction="none", backend=backend)
    assert per_row[:, 3].isnan().all()  # peer 0 imitates the NaN peer: its mimicry is NaN too
    assert not per_row[:, :3].isnan().any()
    assert mutual_loss(logits, target, backend=backend).isnan()


def test_alpha_zero_is_cross_entropy(backend):
    logits, target = make_inputs(3, 12, 9, dtype=torch.float32)
    loss = mutual_loss(logits, target, alpha=0.0, label_smoothing=0.1, backend=backend)
    expected = sum(F.cross_entropy(z, target, label_smoothing=0.1) for z in logits)
    torch.testing.assert_close(loss, expected)


def test_distillation_from_frozen_teacher(backend):
    student = torch.randn(8, 10, requires_grad=True)
    teacher = torch.randn(8, 10, requires_grad=True)
    target = torch.randint(0, 10, (8,))
    out = mutual_loss(
        [student, teacher],
        target,
        temperature=4.0,
        peer_weights=[[0, 1], [0, 0]],
        return_components=True,
        backend=backend,
    )
    out.loss.backward()
    kl = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean")
    torch.testing.assert_close(out.mimicry, torch.stack([kl, torch.zeros(())]).detach())
    teacher_ce = teacher.detach().requires_grad_()
    F.cross_entropy(teacher_ce, target).backward()
    torch.testing.assert_close(teacher.grad, teacher_ce.grad)


def test_components_add_up(backend):
    logits, target = make_inputs(4, 10, 15, dtype=torch.float32)
    logits.requires_grad_()
    for reduction in ["mean", "sum", "none"]:
        out = mutual_loss(
            logits,
            target,
            temperature=2.0,
            alpha=0.3,
            reduction=reduction,
            return_components=True,
            backend=backend,
        )
        assert not out.ce.requires_grad and not out.mimicry.requires_grad
        assert out.ce.shape == ((4,) if reduction != "none" else (4, 10))
        total = out.ce + 0.3 * 4.0 * out.mimicry
        torch.testing.assert_close(out.loss.detach(), total if reduction == "none" else total.sum())


def test_module_matches_function(backend):
    logits, target = make_inputs(3, 10, 15, dtype=torch.float32)
    options = dict(temperature=2.0, alpha=0.5, label_smoothing=0.05, reduction="sum")
    module = MutualLoss(peer_weights=[[0, 1, 1], [1, 0, 0], [0, 0, 0]], backend=backend, **options)
    expected = mutual_loss(
        logits, target, peer_weights=[[0, 1, 1], [1, 0, 0], [0, 0, 0]], backend=backend, **options
    )
    torch.testing.assert_close(module(logits, target), expected)
    assert "peer_weights" in repr(module) and "temperature=2.0" in repr(module)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(backend, mode):
    """Each peer's loss, as a function of its own logits (the peers it imitates held fixed)."""
    logits, target = make_inputs(3, 4, 5, ignore_every=3)
    kwargs = dict(temperature=1.5, alpha=0.7, label_smoothing=0.1, **mode_kwargs(mode, 3))

    def peer_loss(own, k, reduction):
        peers = [own if j == k else logits[j] for j in range(3)]
        loss = mutual_loss(peers, target, reduction="none", backend=backend, **kwargs)[k]
        return loss if reduction == "none" else loss.sum()

    for k in range(3):
        for reduction in ["sum", "none"]:
            own = logits[k].clone().requires_grad_()
            torch.autograd.gradcheck(lambda z, k=k, r=reduction: peer_loss(z, k, r), (own,))


@pytest.mark.parametrize("mode", MODES)
def test_classes_masked_with_minus_inf(backend, mode):
    """-inf logits (masked classes) keep the loss and gradient finite, like F.cross_entropy."""
    logits, target = make_inputs(3, 6, 12, ignore_every=0)
    logits[:, :, 9:] = float("-inf")
    target = target % 9
    out = check_against_naive(logits, target, backend, temperature=2.0, **mode_kwargs(mode, 3))
    assert torch.isfinite(out.loss)


def test_class_masked_by_one_peer_only(backend):
    """Its KL to the others is infinite (they put mass where it puts none); theirs stay finite."""
    logits, target = make_inputs(3, 6, 12, ignore_every=0)
    logits[1, :, 5] = float("-inf")
    target = torch.where(target == 5, 0, target)
    per_peer = mutual_loss(logits, target, return_components=True, backend=backend).mimicry
    assert per_peer[1] == float("inf") and torch.isfinite(per_peer[[0, 2]]).all()


def test_peer_weights_of_any_strides(backend):
    """A transposed view of the weights is read as the matrix it is, not as its storage."""
    logits, target = make_inputs(3, 4, 10, dtype=torch.float32)
    weights = torch.rand(3, 3)
    losses = [
        mutual_loss(logits, target, temperature=2.0, peer_weights=w, backend=backend)
        for w in (weights.t(), weights.t().contiguous())
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@pytest.mark.parametrize(("reduction", "scale"), [("mean", 65536.0), ("none", 256.0)])
def test_float16_gradient_under_loss_scaling(backend, reduction, scale):
    """GradScaler's recipe: the loss times a large scale. The gradient must reach float16 only after
    that scale, as PyTorch's own float16 backward does, or small gradients flush to zero."""
    logits, target = make_inputs(2, 512, 200, dtype=torch.float16, ignore_every=0, scale=4.0)
    ours = logits.clone().requires_grad_()
    (scale * mutual_loss(ours, target, reduction=reduction, backend=backend).sum()).backward()
    exact = logits.double().requires_grad_()
    (scale * mutual_loss(exact, target, reduction=reduction, backend="torch").sum()).backward()
    expected = exact.grad.to(torch.float16)
    assert int(((ours.grad == 0) & (expected != 0)).sum()) == 0
    error = (ours.grad.double() - expected.double()).abs().sum() / expected.double().abs().sum()
    assert error < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_batch_backward(backend, dtype):
    skip_if_unsupported(backend, dtype)
    logits = torch.randn(2, 0, 5).to(dtype).requires_grad_()
    mutual_loss(logits, torch.zeros(0, dtype=torch.long), backend=backend).backward()
    assert logits.grad.shape == logits.shape
