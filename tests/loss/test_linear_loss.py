"""The fused linear mutual loss against `mutual_loss` of materialized logits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdml
from fastdml import FusedLinearMutualLoss, fused_linear_mutual_loss, mutual_loss
from fastdml.loss.linear_loss import default_chunk_size

OPTIONS = [
    pytest.param({}, id="pairwise"),
    pytest.param({"temperature": 2.0, "alpha": 0.5, "label_smoothing": 0.1}, id="options"),
    pytest.param({"mode": "ensemble"}, id="ensemble"),
    pytest.param({"mode": "ensemble_logits", "temperature": 3.0}, id="ensemble_logits"),
    pytest.param({"peer_weights": [[0, 1, 0.5], [0, 0, 1], [2, 0, 0]]}, id="peer_weights"),
]
REDUCTIONS = ["mean", "sum", "none"]


def layers(widths, rows=10, classes=13, dtype=torch.float64, bias=(True, False, True), seed=0):
    """Hidden states [N, H_k], weights [V, H_k] and biases (or None) of peers of `widths`,
    all requiring grad, and a target with one ignored row."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU, whatever the default device
    device = torch.get_default_device()

    def leaf(*shape):
        values = torch.randn(*shape, generator=generator, dtype=torch.float64, device="cpu")
        return values.to(device, dtype).requires_grad_()

    hidden = [leaf(rows, width) for width in widths]
    weight = [leaf(classes, width) for width in widths]
    biases = [leaf(classes) if has else None for has, _ in zip(bias, widths, strict=False)]
    target = torch.randint(0, classes, (rows,), generator=generator, device="cpu").to(device)
    target[1] = -100
    return hidden, weight, biases, target


class MatmulCounter(TorchDispatchMode):
    """The shapes of the operands of every matmul that runs."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append({size for arg in args for size in arg.shape})
        return func(*args, **(kwargs or {}))


def materialized(hidden, weight, biases):
    return [
        torch.nn.functional.linear(h, w, b) for h, w, b in zip(hidden, weight, biases, strict=True)
    ]


def value_and_grads(loss_fn, inputs, seed=1):
    """The loss and the gradients of every input of a random weighting of it."""
    out = loss_fn()
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(out.loss.shape, generator=generator, dtype=out.loss.dtype, device="cpu")
    weights = weights.to(out.loss.device)
    grads = torch.autograd.grad((out.loss * weights).sum(), inputs)
    return out, grads


def assert_matches(hidden, weight, biases, target, atol=1e-10, rtol=1e-7, **options):
    inputs = [t for t in hidden + weight + biases if t is not None and t.requires_grad]
    fused, fused_grads = value_and_grads(
        lambda: fused_linear_mutual_loss(
            hidden, weight, target, biases, return_components=True, **options
        ),
        inputs,
    )
    options.pop("chunk_size", None)
    ref, ref_grads = value_and_grads(
        lambda: mutual_loss(
            materialized(hidden, weight, biases), target, return_components=True, **options
        ),
        inputs,
    )
    for got, expected in zip((*fused, *fused_grads), (*ref, *ref_grads), strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_materialized_logits(options, reduction):
    """Three peers of different widths, one without a bias, in chunks that do not divide N."""
    hidden, weight, biases, target = layers((5, 7, 3))
    assert_matches(hidden, weight, biases, target, chunk_size=4, reduction=reduction, **options)


EXTENDED = [
    pytest.param(dict(divergence="reverse_kl"), id="reverse_kl"),
    pytest.param(dict(divergence="jsd", beta=0.3, mode="ensemble"), id="jsd"),
    pytest.param(dict(ce_weight=0.4, mimic_unlabeled=True), id="ce_weight-unlabeled"),
    pytest.param(dict(normalizer=23.0, mimic_unlabeled=True), id="normalizer"),
    pytest.param(dict(normalizer=torch.tensor(5), divergence="jsd"), id="tensor-normalizer"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", EXTENDED)
def test_extended_options(options, reduction):
    """The loss family beyond the paper's loss, on the backend that backend="auto" picks."""
    if "normalizer" in options and reduction != "mean":
        pytest.skip("a normalizer divides reduction 'mean' only")
    hidden, weight, biases, target = layers((5, 7, 3))
    target[4:7] = -100  # unlabeled rows, which mimic_unlabeled keeps in the mimicry
    assert_matches(hidden, weight, biases, target, chunk_size=4, reduction=reduction, **options)


def test_mimicry_only_without_target():
    hidden, weight, biases, _ = layers((5, 7))
    assert_matches(hidden, weight, biases, None, chunk_size=4, ce_weight=0.0, temperature=2.0)


def test_autocast_runs_the_matmuls_in_its_dtype():
    """As F.linear under autocast: bfloat16 hidden states with float32 weights (what a model's
    body and its lm_head give under autocast), the matmuls in bfloat16, and each gradient in its
    own tensor's dtype."""
    hidden, weight, biases, target = layers((5, 7), dtype=torch.float32, bias=(True, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        body = [h.to(torch.bfloat16) for h in hidden]
        fused = fused_linear_mutual_loss(body, weight, target, biases, chunk_size=4)
        logits = materialized(body, weight, biases)
        assert logits[0].dtype == torch.bfloat16
        expected = mutual_loss(logits, target)
    inputs = [*hidden, *weight, biases[0]]
    grads = torch.autograd.grad(fused, inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    torch.testing.assert_close(fused, expected, rtol=1e-3, atol=1e-3)
    for got, want, tensor in zip(grads, expected_grads, inputs, strict=True):
        assert got.dtype == tensor.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_mixed_dtypes_outside_autocast_name_both_tensors():
    hidden, weight, _, target = layers((5, 7), dtype=torch.float32)
    body = [h.to(torch.bfloat16) for h in hidden]
    with pytest.raises(
        ValueError,
        match=r"hidden\[0\] has torch.bfloat16, weight\[0\] has "
        "torch.float32; cast them to one dtype, or call the loss under "
        "torch.autocast",
    ):
        fused_linear_mutual_loss(body, weight, target)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backends(backend, reduction):
    hidden, weight, biases, target = layers((5, 7), rows=6, classes=11, dtype=torch.float32)
    options = {"temperature": 2.0, "label_smoothing": 0.1, "reduction": reduction}
    assert_matches(
        hidden, weight, biases, target, 1e-5, 1e-5, chunk_size=4, backend=backend, **options
    )


def test_zero_upstream_rows(fused_backend):
    """Rows whose upstream gradient is 0 get none (the fused ops' grad_scale of 0)."""
    hidden, weight, biases, target = layers((3, 4), rows=6, classes=11, dtype=torch.float32)
    loss = fused_linear_mutual_loss(
        hidden, weight, target, biases, reduction="none", chunk_size=4, backend=fused_backend
    )
    upstream = torch.ones_like(loss)
    upstream[:, 2:] = 0
    for grad in torch.autograd.grad(loss, hidden, upstream):
        assert grad[0].ne(0).all() and not grad[1:].any()  # row 1 is ignored


@pytest.mark.parametrize("chunk_size", [1, 3, 10])
def test_chunk_sizes(chunk_size):
    hidden, weight, biases, target = layers((4, 6))
    assert_matches(hidden, weight, biases, target, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    """Peer 0's parameters under a fixed teacher, peer 1: the loss is then a function of them
    whose derivative is the mimicry gradient (the imitated targets are constants)."""
    hidden, weight, biases, target = layers((3, 2), rows=5, classes=4, bias=(True, True))
    teacher = [tensor.detach() for tensor in (hidden[1], weight[1], biases[1])]
    options = {
        "chunk_size": 2,
        "reduction": reduction,
        "temperature": 2.0,
        "label_smoothing": 0.1,
        "peer_weights": [[0, 1], [0, 0]],
    }

    def loss(hidden, weight, bias):
        peers = [list(pair) for pair in zip((hidden, weight, bias), teacher, strict=True)]
        return fused_linear_mutual_loss(peers[0], peers[1], target, peers[2], **options)

    assert torch.autograd.gradcheck(loss, (hidden[0], weight[0], biases[0]))


def test_stacked_inputs_match_lists():
    hidden, weight, biases, target = layers((6, 6), bias=(True, True))
    stacked = [torch.stack(group).detach().requires_grad_() for group in (hidden, weight, biases)]
    out = fused_linear_mutual_loss(stacked[0], stacked[1], target, stacked[2], chunk_size=3)
    grads = torch.autograd.grad(out, stacked)
    ref = mutual_loss(materialized(*stacked), target)
    ref_grads = torch.autograd.grad(ref, stacked)
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_stacked_inputs_that_need_no_gradient():
    """A stacked tensor that needs no gradient (or none of them does) has no gradient buffer."""
    hidden, weight, _, target = layers((4, 4), bias=(False, False))
    hidden, weight = torch.stack(hidden).detach(), torch.stack(weight).detach()
    ref = mutual_loss(materialized(hidden, weight, [None, None]), target)
    torch.testing.assert_close(fused_linear_mutual_loss(hidden, weight, target), ref)
    weight.requires_grad_()
    (grad,) = torch.autograd.grad(fused_linear_mutual_loss(hidden, weight, target), weight)
    ref = mutual_loss(materialized(hidden, weight, [None, None]), target)
    (ref_grad,) = torch.autograd.grad(ref, weight)
    torch.testing.assert_close(grad, ref_grad)


def test_frozen_teacher_costs_no_gradient_matmuls():
    """Distillation from a frozen teacher (peer 1): the student's gradients are those of
    mutual_loss, and only the student's gradient matmuls run."""
    rows, classes, widths = 8, 16, (4, 6)
    hidden, weight, _, target = layers(widths, rows, classes, bias=(False, False))
    hidden[1].requires_grad_(False)
    weight[1].requires_grad_(False)
    options = {"peer_weights": [[0, 1], [0, 0]], "chunk_size": 3}
    assert_matches(hidden, weight, [None, None], target, **options)
    with MatmulCounter() as counter:
        fused_linear_mutual_loss(hidden, weight, target, **options).backward()
    chunks = 3  # of 3, 3 and 2 rows
    teacher = [shapes for shapes in counter.shapes if widths[1] in shapes]
    assert len(teacher) == chunks  # its logits
    assert len(counter.shapes) == 4 * chunks  # and the student's logits and two gradients


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(reduction):
    hidden, weight, biases, target = layers((3, 5))
    target.fill_(-100)
    out = fused_linear_mutual_loss(hidden, weight, target, biases, reduction=reduction)
    grads = torch.autograd.grad(out.sum(), [t for t in hidden + weight + biases if t is not None])
    assert not out.any()
    assert not any(grad.any() for grad in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """The matmuls in the inputs' dtype, the loss in float32, gradients in the inputs' dtype."""
    hidden, weight, biases, target = layers((8, 16), rows=12, classes=40, dtype=dtype)
    assert_matches(hidden, weight, biases, target, 2e-2, 2e-2, chunk_size=5)


def test_upstream_gradient_and_retained_graph():
    hidden, weight, biases, target = layers((3, 4))
    inputs = [t for t in hidden + weight + biases if t is not None]
    loss = fused_linear_mutual_loss(hidden, weight, target, biases, chunk_size=3)
    ones = torch.autograd.grad(loss, inputs, retain_graph=True)
    scaled = torch.autograd.grad(3 * loss, inputs, retain_graph=True)  # recomputed
    zeroed = torch.autograd.grad(0 * loss, inputs)
    for one, three, zero in zip(ones, scaled, zeroed, strict=True):
        torch.testing.assert_close(three, 3 * one)
        assert not zero.any()


def test_no_grad():
    hidden, weight, biases, target = layers((3, 4))
    with torch.no_grad():
        loss = fused_linear_mutual_loss(hidden, weight, target, biases)
        ref = mutual_loss(materialized(hidden, weight, biases), target)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref)


def test_module():
    hidden, weight, biases, target = layers((3, 4))
    options = {"temperature": 2.0, "peer_weights": [[0, 1], [1, 0]], "return_components": True}
    module = FusedLinearMutualLoss(chunk_size=4, **options)
    for got, expected in zip(
        module(hidden, weight, target, biases),
        fused_linear_mutual_loss(hidden, weight, target, biases, **options),
        strict=True,
    ):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearMutualLoss(temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearMutualLoss(chunk_size=0)


def test_torch_compile_fullgraph():
    hidden, weight, biases, target = layers((3, 4), dtype=torch.float32)
    inputs = [t for t in hidden + weight + biases if t is not None]

    def step(hidden, weight, biases, target):
        return fused_linear_mutual_loss(hidden, weight, target, biases, chunk_size=4)

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(hidden, weight, biases, target)
    got_grads = torch.autograd.grad(got, inputs)
    expected = step(hidden, weight, biases, target)
    expected_grads = torch.autograd.grad(expected, inputs)
    torch.testing.assert_close(got, expected)
    for grad, ref in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref)


def test_default_chunk_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(2, 32000, torch.float32, cpu) == 256  # 65.5 MB of logits
    assert default_chunk_size(2, 128256, torch.bfloat16, cuda) == 512  # 263 MB
    assert default_chunk_size(8, 10**7, torch.float32, cpu) == 1
    assert default_chunk_size(2, 300000, torch.float32, cpu) == 27


def test_bad_target_fails_before_any_chunk():
    """A bad target in a later chunk is reported for the whole batch before any matmul runs."""
    hidden, weight, _, target = layers((3, 4))
    target[-1] = 13
    with MatmulCounter() as counter, pytest.raises(ValueError, match="found 13$"):
        fastdml.fused_linear_mutual_loss(hidden, weight, target, chunk_size=2)
    assert counter.shapes == []


def bad(**changes):
    hidden, weight, biases, target = layers((3, 4), bias=(True, True))
    arguments = {"hidden": hidden, "weight": weight, "target": target, "bias": biases}
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        (lambda h, w: bad(weight=w[:1]), ValueError, "same number of peers"),
        (lambda h, w: bad(hidden=[h[0], h[0]]), ValueError, "peer 1: hidden .* H = 3"),
        (lambda h, w: bad(weight=[w[0], w[1][:5]]), ValueError, "same V classes"),
        (lambda h, w: bad(hidden=[h[0], h[1][:4]]), ValueError, "same N rows"),
        (
            lambda h, w: bad(hidden=[h[0], h[1].float()]),
            ValueError,
            r"share one dtype: hidden\[0\] has torch.float64, hidden\[1\] has torch.float32",
        ),
        (lambda h, w: bad(hidden=h[:1], weight=w[:1], bias=None), ValueError, "at least 2"),
        (lambda h, w: bad(hidden=h[0]), ValueError, "stacked tensor"),
        (lambda h, w: bad(hidden="x"), TypeError, "list of K tensors"),
        (lambda h, w: bad(target=torch.zeros(3, dtype=torch.long)), ValueError, "target"),
        (lambda h, w: bad(target=torch.zeros(10)), TypeError, "int64"),
        (lambda h, w: bad(target=torch.full((10,), 13)), ValueError, "target values"),
        (lambda h, w: bad(bias=[None]), ValueError, "bias must hold K = 2"),
        (lambda h, w: bad(bias=[torch.zeros(5), None]), ValueError, r"bias\[0\]"),
        (lambda h, w: {**bad(), "chunk_size": 0}, ValueError, "chunk_size"),
        (lambda h, w: {**bad(), "reduction": "max"}, ValueError, "reduction"),
    ],
)
def test_bad_input(arguments, error, match):
    hidden, weight, _, _ = layers((3, 4))
    with pytest.raises(error, match=match):
        fastdml.fused_linear_mutual_loss(**arguments(hidden, weight))
