"""The fused ops as PyTorch custom ops: opcheck, torch.compile, determinism, extreme shapes."""

import copy
import unittest.mock
from functools import partial

import pytest
import torch
from conftest import INTERPRETED, on_device, skip_if_unsupported
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastdml import MutualLoss, mutual_loss
from fastdml.loss.arguments import make_problem
from fastdml.loss.ops import fused_arguments, fused_op
from fastdml.loss.options import LossOptions

MODES = ["pairwise", "ensemble", "ensemble_logits", "weights"]


def op_args(k=3, n=6, c=11, dtype=torch.float64, mode="pairwise", temperature=2.0, **family):
    """The problem of a small loss; `family`: options of the loss family (divergence, ...)."""
    logits = torch.randn(k, n, c, dtype=dtype)
    target = torch.randint(0, c, (n,))
    target[1] = -100
    weights = torch.rand(k, k).tolist() if mode == "weights" else None
    problem = make_problem(
        logits,
        target,
        LossOptions(
            temperature=temperature,
            alpha=0.5,
            mode="pairwise" if weights else mode,
            peer_weights=weights,
            label_smoothing=0.1,
            ignore_index=-100,
            **family,
        ),
    )
    return problem


# The fused ops of one contract (csrc/ops.cpp): the C++ op's kernels and the Triton op's, on
# their devices.
FUSED_OPS = [
    pytest.param(("cpu", "cpp"), id="cpp"),
    pytest.param(("cpu", "triton"), id="triton"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.cuda),
]
SCALE_OPS = {"cpp": "scale_grad_", "cuda": "scale_grad_", "triton": "triton_scale_grad_"}
# opcheck's AOT-dispatch test hands every output, the gradient buffer included, to the caller,
# whose backward then rescales it in place; the loss never exposes that buffer, and the compile
# tests below run the ops' forward and backward through AOT.
FUSED_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.fixture(params=FUSED_OPS)
def fused(request):
    """A backend's name and its op pair (fused_mutual_loss, scale_grad_), on its device (made the
    default one)."""
    device, name = request.param
    on_device(device, name, request)
    return name, fused_op(name), getattr(torch.ops.fastdml, SCALE_OPS[name])


@pytest.fixture(params=[p for p in FUSED_OPS if p.values[0][1] == "triton"])
def triton_device(request):
    """The Triton op's device: CPU tensors in Triton's interpreter, or the GPU."""
    device, name = request.param
    on_device(device, name, request)
    return device


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_fused(fused, mode, dtype, reduction):
    name, forward, _ = fused
    skip_if_unsupported(name, dtype)
    problem = op_args(mode=mode, dtype=dtype)
    problem.logits.requires_grad_()
    torch.library.opcheck(
        forward.default,
        fused_arguments(problem, reduction, compute_grad=dtype != torch.float16),
        test_utils=FUSED_CHECKS,
    )


FAMILY = [
    pytest.param(dict(divergence="reverse_kl"), id="reverse_kl"),
    pytest.param(dict(divergence="jsd", beta=0.3, ce_weight=0.0), id="jsd-mimicry-only"),
    pytest.param(dict(ce_weight=0.5, mimic_unlabeled=True), id="ce_weight-unlabeled"),
    pytest.param(dict(normalizer=7.0, divergence="jsd"), id="normalizer"),
    pytest.param(dict(normalizer=torch.tensor(7)), id="tensor-normalizer"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILY)
def test_opcheck_fused_family(fused, family, mode, dtype):
    """The loss family's arguments, on every fused op."""
    _, forward, _ = fused
    reduction = "mean" if "normalizer" in family else "none"
    problem = op_args(mode=mode, dtype=dtype, **family)
    problem.logits.requires_grad_()
    torch.library.opcheck(
        forward.default,
        fused_arguments(problem, reduction, compute_grad=dtype != torch.float16),
        test_utils=FUSED_CHECKS,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_fused_with_grad_scale(fused, reduction):
    _, forward, scale_grad = fused
    problem = op_args(mode="weights", dtype=torch.float32)
    k, rows, _ = problem.logits.shape
    grad_scale = torch.rand(rows, k).t() if reduction == "none" else torch.tensor(0.5)
    problem.logits.requires_grad_()
    args = fused_arguments(problem, reduction, grad_scale)
    torch.library.opcheck(forward.default, args, test_utils=FUSED_CHECKS)
    grad = forward(*args)[3].detach()
    torch.library.opcheck(scale_grad.default, (grad, grad_scale))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_gradient_is_that_of_its_loss(fused, reduction, mode, temperature):
    """The gradient the op writes is that of the loss it returns, times grad_scale (exactly:
    zero included)."""
    _, forward, _ = fused
    problem = op_args(mode=mode, temperature=temperature)
    k, rows, _ = problem.logits.shape
    grad_scale = None
    if reduction == "none":
        grad_scale = torch.rand(k, rows, dtype=torch.float64)
        grad_scale[1, 3] = 0.0
    loss, *_, grad = forward(*fused_arguments(problem, reduction, grad_scale))
    logits = problem.logits.clone().requires_grad_()
    rows_loss = mutual_loss(
        logits,
        problem.target,
        temperature=temperature,
        alpha=0.5,
        mode="pairwise" if mode == "weights" else mode,
        peer_weights=problem.peer_weights,
        label_smoothing=0.1,
        reduction=reduction,
        backend="torch",
    )
    torch.testing.assert_close(loss, rows_loss.detach())
    upstream = torch.ones_like(loss) if grad_scale is None else grad_scale
    (want,) = torch.autograd.grad(rows_loss, logits, upstream)
    torch.testing.assert_close(grad, want)


def test_gradient_buffer_changed_by_a_caller_is_computed_again(fused):
    """The op returns its gradient buffer, which its backward rescales and hands to autograd;
    if a caller has written to it since, the backward computes the gradient again."""
    _, forward, _ = fused
    problem = op_args(dtype=torch.float32)
    logits = problem.logits.requires_grad_()
    expected = mutual_loss(
        logits, problem.target, temperature=2.0, alpha=0.5, label_smoothing=0.1, backend="torch"
    )
    (want,) = torch.autograd.grad(5 * expected, logits)
    loss, _, _, kept = forward(*fused_arguments(problem, "mean"))
    kept.zero_()
    (got,) = torch.autograd.grad(5 * loss, logits)
    torch.testing.assert_close(got, want)


def test_scale_grad_is_not_differentiable(fused):
    _, _, scale_grad = fused
    grad = torch.randn(2, 3, 4, requires_grad=True).exp()
    with pytest.raises(RuntimeError, match="not differentiable"):
        scale_grad(grad, torch.tensor(2.0))


def test_scale_grad_skips_what_is_scaled_by_one(fused):
    _, _, scale_grad = fused
    grad = torch.randn(2, 3, 5)
    grad_loss = torch.ones(2, 3)
    grad_loss[1, 0], grad_loss[0, 2] = 3.0, float("nan")
    expected = grad.clone()
    expected[1, 0] *= 3
    expected[0, 2] = float("nan")
    scale_grad(grad, grad_loss)
    torch.testing.assert_close(grad, expected, equal_nan=True)
    scale_grad(grad, torch.tensor(2.0))
    torch.testing.assert_close(grad, 2 * expected, equal_nan=True)


def test_cpu_op_checks_targets_before_its_kernel():
    problem = op_args(dtype=torch.float32)
    problem.target[4] = 11
    with pytest.raises(ValueError, match=r"\[0, 11\).*found 11 \(row 4\)"):
        torch.ops.fastdml.fused_mutual_loss(*fused_arguments(problem, "mean"))


class CountOps(TorchDispatchMode):
    """The ATen and custom ops dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["function", "module"])
def test_fused_loss_dispatches_two_ops(fused, form):
    """Forward and backward of the fused loss: the op and the rescale, nothing else but autograd's
    (the upstream gradient's fill); on the GPU without a host sync (the targets are checked and
    the rows counted on the device), nor in Triton's interpreter, which runs that GPU code."""
    name, forward, scale_grad = fused
    criterion = MutualLoss(backend=name) if form == "module" else partial(mutual_loss, backend=name)
    logits = torch.randn(2, 128, 100, requires_grad=True)
    target = torch.randint(0, 100, (128,))
    target[5] = -100
    on_gpu = logits.device.type == "cuda"
    sync_mode = torch.cuda.get_sync_debug_mode() if on_gpu else None
    with CountOps() as counted:
        if on_gpu:
            torch.cuda.set_sync_debug_mode("error")
        try:
            criterion(logits, target).backward()
        finally:
            if on_gpu:
                torch.cuda.set_sync_debug_mode(sync_mode)
    assert [op for op in counted.ops if "fastdml" in op] == [
        str(forward.default),
        str(scale_grad.default),
    ]
    assert len(counted.ops) <= 4, counted.ops
    if name != "cpp":  # the CPU op range-checks the targets on the host
        assert "aten._local_scalar_dense.default" not in counted.ops


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_loss_launches_two_kernels(request, backend, reduction):
    """A training step's loss on CUDA: the forward kernel (no memset: the stream's ticket is
    zeroed once, on the first forward, the warm-up here) and the backward's rescale, which returns
    at once where the upstream gradient is 1; besides them only autograd's fill of that
    gradient."""
    from torch.profiler import ProfilerActivity, profile

    on_device("cuda", backend, request)
    logits = torch.randn(2, 128, 100, requires_grad=True)
    target = torch.randint(0, 100, (128,))
    mutual_loss(logits, target, reduction=reduction, backend=backend).backward()  # warm-up
    logits.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mutual_loss(logits, target, reduction=reduction, backend=backend).backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if "mutual_loss" in n or "scale_grad" in n]
    assert len(ours) == 2, names
    others = [n for n in names if n not in ours]
    assert len(others) <= 1, names


@pytest.mark.parametrize("mode", ["pairwise", "ensemble", "ensemble_logits"])
def test_uniform_modes_read_no_weights(fused, mode):
    """The weights are read in mode "weights" only: the other modes use their closed forms."""
    _, forward, _ = fused
    problem = op_args(mode=mode, dtype=torch.float32)
    args = fused_arguments(problem, "none", compute_grad=True)
    nan_weights = torch.full((3, 3), float("nan"))
    garbage = (*args[:2], nan_weights, *args[3:])
    for got, expected in zip(forward(*garbage), forward(*args), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_no_double_backward_is_an_error(fused_backend):
    """A gradient that silently had no graph would drop the loss's part of a second derivative."""
    name = fused_backend
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = mutual_loss(logits, torch.randint(0, 7, (4,)), backend=name)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)


def test_backward_allocates_no_copy_of_the_logits(fused_backend):
    """The backward hands out the forward's gradient buffer: autograd must not fill a zero tensor
    the size of the logits for the buffer's own (unused) output gradient."""
    name = fused_backend
    logits = torch.randn(2, 16, 300, requires_grad=True)
    loss = mutual_loss(logits, torch.randint(0, 300, (16,)), backend=name)
    large = []

    class RecordLarge(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= logits.numel():
                large.append(str(func))
            return out

    with RecordLarge():
        loss.backward()
    assert [op for op in large if not op.startswith("aten.detach")] == []


def against_torch(logits, target, mode, reduction, **options):
    """Loss, terms and gradient of the Triton backend and of the torch one, on the same input."""
    weights = dict(peer_weights=torch.rand(3, 3)) if mode == "weights" else dict(mode=mode)
    results = []
    for name in ["torch", "triton"]:
        z = logits.clone().requires_grad_()
        out = mutual_loss(
            z, target, reduction=reduction, return_components=True, backend=name,
            **weights, **options,
        )  # fmt: skip
        (out.loss.sum() if reduction == "none" else out.loss).backward()
        results.append((*out, z.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(dict(), id="kl"),
        pytest.param(
            dict(divergence="jsd", beta=0.3, ce_weight=0.5, mimic_unlabeled=True), id="jsd"
        ),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_splits_the_classes_of_few_rows(triton_device, monkeypatch, mode, reduction, family):
    """Few rows, many classes: each row's classes spread over programs, merged exactly (a
    divergence other than KL writes its gradient in a fourth launch, after the rows' sums)."""
    from fastdml.kernels import mutual_loss as triton_kernels

    monkeypatch.setattr(triton_kernels, "SPLIT_MIN_CLASSES", 64)
    logits = 3 * torch.randn(3, 5, 1000)
    logits[:, 2, 900:] = float("-inf")
    target = torch.randint(0, 900, (5,))
    target[1] = -100
    against_torch(logits, target, mode, reduction, temperature=2.0, label_smoothing=0.1, **family)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_rows_of_many_tiles(triton_device, monkeypatch, mode, reduction):
    """Rows of several whole tiles and a masked tail (one warp a program: tiles of 32 vectors),
    pass 2 reading them last first, and more rows than programs: each program takes several."""
    from fastdml.kernels import mutual_loss as triton_kernels

    monkeypatch.setattr(triton_kernels, "_MAX_WARPS", 1)
    logits = 3 * torch.randn(3, 70, 300)  # float32: 75 vectors of 4 classes, 2 tiles and a tail
    logits[:, 3, 250:] = float("-inf")
    target = torch.randint(0, 250, (70,))
    target[[1, 40]] = -100
    against_torch(logits, target, mode, reduction, temperature=2.0, label_smoothing=0.1)


@pytest.mark.parametrize(
    ("peers", "classes", "dtype", "strides", "vec"),
    [
        (2, 1000, torch.float32, (), 4),  # 16-byte vectors of rows not divisible by 16
        (4, 1000, torch.bfloat16, (), 4),  # 16 registers a class of all peers
        (2, 1000, torch.bfloat16, (), 8),
        (4, 1000, torch.float64, (), 2),
        (8, 1000, torch.float64, (), 1),  # float64 takes two registers
        (2, 50257, torch.float32, (), 1),  # rows that start unaligned: one class at a time
        (16, 1000, torch.float32, (), 1),
        (2, 1000, torch.float32, (1002,), 2),  # a stride that only 2 divides
    ],
)
def test_triton_vector_width(peers, classes, dtype, strides, vec):
    from fastdml.kernels import mutual_loss as triton_kernels

    assert triton_kernels.vector_width(peers, classes, dtype, strides) == vec


def test_triton_plan_single_tile_and_split():
    from fastdml.kernels import mutual_loss as triton_kernels

    def stages(rows, classes, divergence="kl"):
        work = triton_kernels.plan(
            2, rows, classes, 4, torch.float32, torch.device("cuda"), "pairwise", False, False,
            True, "mean", 0, divergence,
        )  # fmt: skip
        return [(launch.constexprs["STAGE"], launch.constexprs["SINGLE_TILE"]) for launch in
                work.launches], work.splits  # fmt: skip

    with unittest.mock.patch.object(triton_kernels, "_multiprocessors", lambda device: 132):
        assert stages(128, 100) == ([(0, True)], 1)
        assert stages(8192, 32000) == ([(0, False)], 1)
        assert stages(4, 131072) == ([(1, False), (2, False), (3, False)], 8)
        # The gradient of a divergence other than KL needs the rows' sums first.
        split_grad = [(1, False), (2, False), (4, False), (3, False)]
        assert stages(4, 131072, "reverse_kl") == (split_grad, 8)


@pytest.mark.parametrize("setting", ["4", "4,128,1", "3,128", "4,300", "four,128"])
def test_triton_tile_setting_is_checked(setting):
    from fastdml.kernels import mutual_loss as triton_kernels

    with pytest.raises(ValueError, match="FASTDML_TRITON_TILE must be WARPS,REGISTERS"):
        triton_kernels._tile_setting(setting)
    assert triton_kernels._tile_setting("8,255") == (8, 255)


def test_triton_refuses_options_beyond_float32(triton_device):
    """The kernels take their options as float32 pairs: an alpha past float32's range is an
    error, not a NaN loss."""
    logits, target = torch.randn(2, 3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"alpha \* temperature = 1e\+39 is beyond the float32"):
        mutual_loss(logits, target, alpha=1e39, backend="triton")


def test_logits_are_not_written(fused_backend):
    logits = torch.randn(3, 6, 11, requires_grad=True)
    before = logits.detach().clone()
    target = torch.randint(0, 11, (6,))
    mutual_loss(logits, target, temperature=2.0, backend=fused_backend).backward()
    assert torch.equal(logits.detach(), before)


def test_retained_graph_gives_the_same_gradient_twice(fused_backend):
    logits = torch.randn(3, 6, 11, requires_grad=True)
    target = torch.randint(0, 11, (6,))
    loss = mutual_loss(logits, target, temperature=2.0, backend=fused_backend)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(logits.grad, 3 * first)


def test_kernels_give_nan_rows_for_out_of_range_targets(fused):
    """The GPU kernels check the targets themselves, with no host sync: NaN in the rows of a
    target out of range (and so in a reduced loss), the others untouched."""
    name, forward, _ = fused
    if name == "cpp":
        pytest.skip("the CPU op raises instead (test_cpu_op_checks_targets_before_its_kernel)")
    problem = op_args(mode="pairwise", dtype=torch.float32)
    problem.target[[0, 2]] = torch.tensor([11, -3])
    loss, ce, mimicry, grad = forward(*fused_arguments(problem, "none", compute_grad=True))
    for rows in (loss, ce, mimicry, grad):
        assert rows[:, [0, 2]].isnan().all()
        assert not rows[:, [1, 3, 4, 5]].isnan().any()
    loss, ce, mimicry, grad = forward(*fused_arguments(problem, "mean", compute_grad=True))
    assert loss.isnan() and ce.isnan().all() and mimicry.isnan().all()
    assert grad[:, [0, 2]].isnan().all() and not grad[:, [1, 3, 4, 5]].isnan().any()


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("peers", "classes", "dtype"), [(4, 32000, torch.float32), (2, 128256, torch.bfloat16)]
)
def test_cuda_long_rows(peers, classes, dtype):
    """Rows past one block's shared memory: on sm_90 a thread-block cluster holds each row (a chunk
    a block), elsewhere the rest of the row is read again. The loss and gradient of the reference,
    bit-identical on a rerun."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rows = 2 * torch.cuda.get_device_properties(0).multi_processor_count  # not split
    logits = (4 * torch.randn(peers, rows, classes, device="cuda")).to(dtype)
    target = torch.randint(0, classes, (rows,), device="cuda")
    target[1] = -100
    runs = []
    for _ in range(2):
        probe = logits.detach().clone().requires_grad_()
        loss = mutual_loss(probe, target, temperature=2.0, backend="cuda")
        loss.backward()
        runs.append((loss, probe.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    wide = logits.detach().double().requires_grad_()
    expected = mutual_loss(wide, target, temperature=2.0, backend="torch")
    expected.backward()
    torch.testing.assert_close(runs[0][0].double(), expected, rtol=1e-5, atol=1e-6)
    # Within float32's few ulp (approximate exponentials) or a rounding to the dtype, of the
    # largest entry.
    scale = wide.grad.abs().max()
    atol = max(torch.finfo(dtype).eps, 1e-5)
    torch.testing.assert_close(runs[0][1].double() / scale, wide.grad / scale, rtol=0, atol=atol)


@pytest.mark.cuda
def test_invalid_targets_give_nan_rows_without_a_sync():
    """On the GPU the kernels check targets themselves: NaN rows, no error, no device assert."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for backend in ["triton", "cuda"]:
        logits = torch.randn(2, 4, 7, device="cuda", requires_grad=True)
        target = torch.tensor([1, 7, -3, 2], device="cuda")
        loss = mutual_loss(logits, target, reduction="none", backend=backend)
        loss.sum().backward()
        assert loss[:, 1:3].isnan().all() and not loss[:, [0, 3]].isnan().any()
        assert logits.grad[:, 1:3].isnan().all() and not logits.grad[:, [0, 3]].isnan().any()


class Cohort(nn.Module):
    """K linear peers on the same input, their logits stacked."""

    def __init__(self, k: int, features: int, classes: int) -> None:
        super().__init__()
        self.peers = nn.ModuleList(nn.Linear(features, classes) for _ in range(k))

    def forward(self, x):
        return torch.stack([peer(x) for peer in self.peers])


@pytest.mark.parametrize("mode", ["pairwise", "ensemble_logits"])
def test_compile_fullgraph(fused_backend, mode):
    backend = fused_backend
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


def test_compile_follows_changing_options(fused_backend):
    backend = fused_backend
    """Annealed temperature and alpha, and dynamic shapes, stay in one graph without breaks."""
    torch._dynamo.reset()
    criterion = MutualLoss(backend=backend)
    compiled = torch.compile(criterion, fullgraph=True, dynamic=True)
    for step, n in enumerate([8, 12, 16]):
        criterion.temperature, criterion.alpha = 1.0 + step, 0.5 * step
        logits, target = torch.randn(2, n, 10), torch.randint(0, 10, (n,))
        torch.testing.assert_close(compiled(logits, target), criterion(logits, target))


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_deterministic(fused_backend, divergence):
    """Bit-identical from run to run, for each divergence's passes."""
    backend = fused_backend
    threads = torch.get_num_threads()
    # Triton's interpreter runs the rows one by one, slowly (its threads change nothing): fewer
    # rows there.
    rows = 24 if backend == "triton" and INTERPRETED else 300
    logits = torch.randn(4, rows, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (rows,))
    kwargs = dict(temperature=2.0, backend=backend, reduction="none", divergence=divergence)

    def run(num_threads):
        torch.set_num_threads(num_threads)
        logits.grad = None
        loss = mutual_loss(logits, target, **kwargs)
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


def test_reduced_loss_is_deterministic(fused_backend):
    """A mean over more rows than the GPU ops' programs: its sum over rows has a fixed order."""
    logits = torch.randn(3, 64, 300)
    target = torch.randint(0, 300, (64,))
    target[::5] = -100
    runs = [
        mutual_loss(logits, target, backend=fused_backend, return_components=True) for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("mode", MODES)
def test_very_many_classes(fused_backend, mode, divergence):
    backend = fused_backend
    k, c = 3, 262144
    logits = 4 * torch.randn(k, 3, c)
    target = torch.tensor([0, c - 1, 7])
    weights = dict(peer_weights=torch.rand(k, k)) if mode == "weights" else dict(mode=mode)
    results = []
    for name in ["torch", backend]:
        z = logits.clone().requires_grad_()
        out = mutual_loss(
            z,
            target,
            temperature=2.0,
            return_components=True,
            backend=name,
            divergence=divergence,
            **weights,
        )
        out.loss.backward()
        results.append((*out, z.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_more_than_2_pow_31_elements(fused_backend):
    """Offsets past 2**31 elements: the last rows must come out like the first ones."""
    backend = fused_backend
    if backend == "triton" and INTERPRETED:
        pytest.skip("too large for Triton's interpreter: runs on the GPU")
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


def test_triton_peer_stride_past_2_pow_31(tmp_path):
    """A peer stride of more than 2**31 elements (rows of K >= 3 peers at language-model sizes):
    a sparse file's views, read in the interpreter, where the offset wrapping to 32 bits would
    read the planted decoy instead of peer 1."""
    if not INTERPRETED:
        pytest.skip("the interpreter's check; on the GPU, test_more_than_2_pow_31_elements")
    rows, c = 4, 64
    stride = 2**32 + c  # a multiple of the vector width, its quotient within 32 bits
    path = tmp_path / "sparse.bin"
    with path.open("wb") as file:
        file.truncate(4 * (stride + rows * c))  # no disk blocks until written
    storage = torch.from_file(str(path), shared=True, size=stride + rows * c)
    logits = storage.as_strided((2, rows, c), (stride, c, 1))
    logits[0], logits[1] = torch.randn(rows, c), 3 * torch.randn(rows, c)
    storage[c : c + rows * c] = 100.0  # where stride mod 2**32 points
    target = torch.randint(0, c, (rows,))
    got = mutual_loss(logits, target, backend="triton", return_components=True)
    want = mutual_loss(logits.contiguous(), target, backend="torch", return_components=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_of_a_training_step(backend):
    """No host-device sync in forward or backward: a whole training step replays as a graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = Cohort(3, 8, 10).cuda()
    twin = copy.deepcopy(model)
    criterion = MutualLoss(temperature=2.0, label_smoothing=0.1, backend=backend)
    x = torch.randn(16, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")

    def training_step(net, optimizer):
        optimizer.zero_grad(set_to_none=False)
        loss = criterion(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation, allocator) off the graph
        for _ in range(3):
            training_step(model, optimizer)
            training_step(twin, twin_optimizer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = training_step(model, optimizer)
    for _ in range(4):
        x.copy_(torch.randn(16, 8, device="cuda"))
        y.copy_(torch.randint(0, 10, (16,), device="cuda"))
        graph.replay()
        expected = training_step(twin, twin_optimizer)
        torch.testing.assert_close(captured_loss, expected)
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want)
