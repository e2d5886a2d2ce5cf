"""The loss family beyond the paper's: reverse KL and generalized JSD(beta), mimicry-only losses,
a global normalizer and unlabeled rows, against the naive float64 loop, on every backend, each on
the devices it runs on (conftest's `backend` and `fused_backend` fixtures)."""

import dataclasses

import pytest
import torch
from conftest import BACKENDS, on_device, skip_if_unsupported
from naive import naive_mutual_loss
from test_mutual_loss import MODES, check_against_naive, make_inputs, mode_kwargs

from fastdml import MutualLoss, mutual_loss
from fastdml.loss import reference
from fastdml.loss.arguments import make_problem
from fastdml.loss.ops import fused_arguments, fused_op
from fastdml.loss.options import LossOptions

# Triton's interpreter (backend "triton" on CPU tensors) takes minutes for a gradcheck's hundreds
# of calls, 20 of them more than CI's time: there the Triton op's gradient is checked against the
# naive float64 loop's (the tests above), and by gradcheck on a GPU.
uninterpreted_backend = pytest.mark.parametrize(
    "backend", [p for p in BACKENDS if p.values[0] != ("cpu", "triton")], indirect=True
)


DIVERGENCES = [
    pytest.param(dict(divergence="reverse_kl"), id="reverse_kl"),
    pytest.param(dict(divergence="jsd", beta=0.5), id="jsd-0.5"),
    pytest.param(dict(divergence="jsd", beta=0.1), id="jsd-0.1"),
    pytest.param(dict(divergence="jsd", beta=0.0), id="jsd-0"),
    pytest.param(dict(divergence="jsd", beta=1.0), id="jsd-1"),
]
OPTIONS = [
    pytest.param(dict(temperature=1.0, alpha=1.0), id="T1"),
    pytest.param(dict(temperature=2.0, alpha=0.5, label_smoothing=0.1), id="T2-eps"),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_match_naive(backend, divergence, mode, reduction, options):
    for k in (2, 3):
        logits, target = make_inputs(k, 9, 23)
        check_against_naive(
            logits,
            target,
            backend,
            reduction=reduction,
            **mode_kwargs(mode, k),
            **divergence,
            **options,
        )


def test_jsd_endpoints_are_the_two_kls(backend):
    """beta = 0 is KL(t || q_k) (the default divergence), beta = 1 the reverse KL."""
    logits, target = make_inputs(3, 6, 11)
    for beta, same in ((0.0, dict(divergence="kl")), (1.0, dict(divergence="reverse_kl"))):
        jsd = mutual_loss(logits, target, divergence="jsd", beta=beta, backend=backend)
        torch.testing.assert_close(jsd, mutual_loss(logits, target, backend=backend, **same))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6])
def test_jsd_near_its_endpoints_in_float32(fused_backend, beta, mode):
    """Near beta = 0 or 1 the mixture is within a hair of one of its terms, and the JSD and its
    gradient are of the order of the hair: float32 keeps their digits only where log m is taken
    relative to that term (the tolerances are relative to values of about 1e-6)."""
    logits, _ = make_inputs(3, 8, 500, dtype=torch.float32)
    options = dict(ce_weight=0.0, divergence="jsd", beta=beta, **mode_kwargs(mode, 3))
    check_against_naive(logits, None, fused_backend, rtol=1e-4, atol=1e-12, **options)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.7])
def test_jsd_of_peers_far_apart_in_float32(fused_backend, beta):
    """A class one peer gives about 1e-44 (a float32 subnormal, or 0 where an exp flushes it)
    and the other nearly 1: the mixture is the larger term's, to float32's precision."""
    logits = torch.zeros(2, 3, 5)
    logits[0, :, 1], logits[1, :, 1] = -100.0, 12.0
    logits[:, 1] = logits[:, 1].flip(0)  # the other peer far below too
    check_against_naive(
        logits, None, fused_backend, rtol=1e-4, atol=1e-7, ce_weight=0.0, divergence="jsd",
        beta=beta,
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES[:2])
def test_rows_of_many_chunks(backend, divergence, mode):
    """Rows longer than the CPU kernel's chunk of classes (about 1024 / K of them, the last one
    partial): each pass adds up its chunks."""
    logits, target = make_inputs(3, 5, 1000)
    options = dict(temperature=2.0, label_smoothing=0.1, mimic_unlabeled=True)
    check_against_naive(logits, target, backend, **mode_kwargs(mode, 3), **divergence, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES[:2])
def test_low_precision_dtypes(backend, divergence, mode, dtype):
    """Computed in float32 from the rounded logits: within the tolerances of the paper's loss,
    against float64 on the same logits."""
    skip_if_unsupported(backend, dtype)
    logits, target = make_inputs(3, 16, 100, dtype=dtype)
    options = dict(temperature=2.0, label_smoothing=0.1, mimic_unlabeled=True, ce_weight=0.5)
    check_against_naive(logits, target, backend, **mode_kwargs(mode, 3), **divergence, **options)


@uninterpreted_backend
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(backend, divergence, mode):
    """Each peer's gradient is that of its own loss with the other peers fixed (the targets are
    constants), in float64 against finite differences."""
    logits, target = make_inputs(3, 4, 7, scale=1.0)
    kwargs = dict(temperature=2.0, reduction="none", backend=backend, **divergence)
    kwargs |= mode_kwargs(mode, 3)
    for k in range(3):

        def own_loss(z_k, k=k):
            peers = [z_k if j == k else logits[j] for j in range(3)]
            return mutual_loss(peers, target, **kwargs)[k].sum()

        assert torch.autograd.gradcheck(own_loss, (logits[k].clone().requires_grad_(),))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", MODES)
def test_classes_every_peer_masks(backend, divergence, mode):
    """Classes that every peer masks with -inf logits add nothing; the rest as without them."""
    logits, target = make_inputs(3, 6, 11)
    target[target >= 9] = 0
    logits[:, :, 9:] = float("-inf")
    kwargs = dict(temperature=2.0, backend=backend, **divergence, **mode_kwargs(mode, 3))
    check_against_naive(logits, target, **kwargs)
    finite = mutual_loss(logits[:, :, :9], target, **kwargs)
    torch.testing.assert_close(mutual_loss(logits, target, **kwargs), finite)
    # Without a cross-entropy, a target in the masked classes costs nothing (no 0 * inf either).
    mimicry_only = dict(kwargs, ce_weight=0.0)
    expected = mutual_loss(logits, target, **mimicry_only)
    target[target != -100] = 10
    torch.testing.assert_close(mutual_loss(logits, target, **mimicry_only), expected)


@pytest.mark.parametrize("mode", MODES)
def test_reverse_kl_of_a_target_that_masks_a_class(backend, mode):
    """Where one peer masks a class that the others keep, KL(q_k || t) is inf wherever the
    target is 0 there (each pair's, peer_weights', ensemble_logits'; not the ensemble's mean of
    the others): not NaN, nor a clamped finite number, as in the reference. The JSD stays
    finite."""
    logits, target = make_inputs(3, 4, 7)
    logits[1, :, 0] = float("-inf")
    kwargs = dict(reduction="none", return_components=True, **mode_kwargs(mode, 3))
    for divergence in ("reverse_kl", "jsd"):
        expected = mutual_loss(logits, target, backend="torch", divergence=divergence, **kwargs)
        got = mutual_loss(logits, target, backend=backend, divergence=divergence, **kwargs)
        torch.testing.assert_close(got.mimicry, expected.mimicry)
        assert not got.mimicry.isnan().any()
        assert got.mimicry.isinf().any() == (divergence == "reverse_kl" and mode != "ensemble")


@pytest.mark.parametrize("divergence", [dict(divergence="kl"), *DIVERGENCES[:2]])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mimicry_only(backend, divergence, reduction):
    """ce_weight = 0: the loss is the mimicry alone; without a target every row counts, with one
    the ignored rows are masked."""
    logits, target = make_inputs(3, 8, 13)
    kwargs = dict(ce_weight=0.0, reduction=reduction, temperature=2.0, **divergence)
    check_against_naive(logits, None, backend, **kwargs)
    check_against_naive(logits, target, backend, **kwargs)
    full = mutual_loss(logits, None, backend=backend, return_components=True, **kwargs)
    assert not full.ce.any()


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("divergence", [dict(divergence="kl"), DIVERGENCES[1]])
def test_ce_weight(backend, divergence, ce_weight):
    logits, target = make_inputs(2, 8, 13)
    for temperature in (1.0, 2.0):
        check_against_naive(
            logits, target, backend, ce_weight=ce_weight, temperature=temperature, **divergence
        )


def test_normalizer_changed_before_backward_is_an_error(backend):
    """A tensor normalizer changed in place between forward and backward raises where the
    backward would read it (float16 computes its gradient there), never a silent wrong scale."""
    logits = torch.randn(2, 4, 16).half().requires_grad_()
    normalizer = torch.tensor(4.0, device=torch.get_default_device())
    loss = mutual_loss(logits, torch.tensor([0, 3, 5, 7]), backend=backend, normalizer=normalizer)
    normalizer.mul_(100)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(
    "normalizer",
    [37, 2.5, torch.tensor(37), torch.tensor(9.0), torch.tensor(0.5, dtype=torch.float64)],
    ids=["int", "float", "int64-tensor", "float32-tensor", "float64-tensor"],
)
@pytest.mark.parametrize("mimic_unlabeled", [False, True])
def test_normalizer(backend, normalizer, mimic_unlabeled):
    """The sum over peers and rows divided by the normalizer, for both terms."""
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(torch.get_default_device())  # the logits' device
    logits, target = make_inputs(3, 8, 13)
    kwargs = dict(normalizer=normalizer, mimic_unlabeled=mimic_unlabeled, divergence="jsd")
    check_against_naive(logits, target, backend, **kwargs)
    summed = mutual_loss(logits, target, backend=backend, reduction="sum", **kwargs | dict(
        normalizer=None))  # fmt: skip
    got = mutual_loss(logits, target, backend=backend, **kwargs)
    torch.testing.assert_close(got, summed / float(normalizer))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_mimic_unlabeled(backend, mode, reduction):
    """Unlabeled rows keep their mimicry term, not their cross-entropy: "mean" averages each term
    over the rows it covers."""
    logits, target = make_inputs(3, 8, 13, ignore_every=2)
    kwargs = dict(mimic_unlabeled=True, reduction=reduction, **mode_kwargs(mode, 3))
    out = check_against_naive(logits, target, backend, **kwargs)
    if reduction == "none":
        unlabeled = target == -100
        assert not out.ce[:, unlabeled].any() and out.mimicry[:, unlabeled].all()


def test_defaults_give_the_paper_loss(backend):
    """The new options at their defaults change nothing."""
    logits, target = make_inputs(3, 8, 13)
    explicit = dict(divergence="kl", ce_weight=1.0, normalizer=None, mimic_unlabeled=False)
    torch.testing.assert_close(
        mutual_loss(logits, target, backend=backend, **explicit),
        mutual_loss(logits, target, backend=backend),
    )


def test_alpha_as_a_tensor():
    logits, target = make_inputs(2, 8, 13)
    got = mutual_loss(logits, target, alpha=torch.tensor(0.25))
    torch.testing.assert_close(got, mutual_loss(logits, target, alpha=0.25))
    assert MutualLoss(alpha=torch.tensor(0.25, dtype=torch.float64)).alpha == 0.25


@pytest.mark.parametrize(
    ("options", "family"),
    [
        (dict(divergence="reverse_kl"), True),
        (dict(divergence="jsd", beta=0.3), True),
        (dict(ce_weight=0.5), True),
        (dict(normalizer=3), True),
        (dict(mimic_unlabeled=True), True),
        (dict(divergence="kl", beta=0.3, ce_weight=1.0), False),
        (dict(divergence="jsd", beta=0.0), False),  # the KL itself
        (dict(divergence="jsd", beta=1.0), True),  # the reverse KL
    ],
)
def test_auto_computes_the_family(options, family):
    """backend="auto" computes every option; LossOptions.uses_family, which sets the order in
    which it tries the backends (test_backends.py), tells the family's options from the paper's
    loss (beta is unused by "kl", and "jsd" at beta 0 is the KL)."""
    assert LossOptions(**options).uses_family == family
    logits, target = make_inputs(2, 8, 13)
    torch.testing.assert_close(
        mutual_loss(logits, target, **options),
        mutual_loss(logits, target, backend="torch", **options),
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(divergence="js"), "divergence must be one of"),
        (dict(divergence="jsd", beta=1.5), r"beta must be a number in \[0, 1\]"),
        (dict(beta=-0.1), r"beta must be a number in \[0, 1\]"),
        (dict(ce_weight=-1.0), "ce_weight must be a finite number >= 0"),
        (dict(ce_weight=float("nan")), "ce_weight must be a finite number >= 0"),
        (dict(normalizer=0), "normalizer must be a finite number > 0"),
        (dict(normalizer=-3.0), "normalizer must be a finite number > 0"),
        (dict(normalizer=torch.tensor(0.0)), "normalizer must be > 0"),
        (dict(normalizer=torch.ones(2)), "0-dim real tensor"),
        (dict(normalizer=4, reduction="sum"), "reduction='mean'"),
        (dict(alpha=torch.tensor(-1.0)), "alpha must be a finite number >= 0"),
    ],
)
def test_bad_options(options, message):
    logits, target = make_inputs(2, 4, 5)
    with pytest.raises(ValueError, match=message):
        mutual_loss(logits, target, **options)
    with pytest.raises(ValueError, match=message):
        MutualLoss(**options)


def test_target_none_needs_ce_weight_zero():
    logits, _ = make_inputs(2, 4, 5)
    with pytest.raises(ValueError, match="target=None .* ce_weight=0"):
        mutual_loss(logits, None)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES[:3])
def test_op_gradient_is_that_of_its_loss(fused_backend, divergence, reduction):
    """The gradient the op writes with a grad_scale (0-dim, or [K, R] at any strides with a zero)
    is that of sum(grad_scale * loss) for the loss of the reference, each term weighed as the
    loss weighs it."""
    logits, target = make_inputs(3, 8, 11, ignore_every=3)
    options = dict(temperature=2.0, alpha=0.5, label_smoothing=0.1, ce_weight=0.7, **divergence)
    if reduction == "mean":
        options |= dict(normalizer=torch.tensor(6))
        grad_scale = torch.tensor(0.3, dtype=torch.float64)
    else:
        grad_scale = torch.rand(8, 3, dtype=torch.float64).t()
        grad_scale[1, 3] = 0.0
    for mimic_unlabeled in (False, True):
        problem = make_problem(
            logits, target, LossOptions(mimic_unlabeled=mimic_unlabeled, **options)
        )
        loss, ce, mimicry, grad = fused_op(fused_backend)(
            *fused_arguments(problem, reduction, grad_scale)
        )
        z = logits.clone().requires_grad_()
        expected = reference.mutual_loss(dataclasses.replace(problem, logits=z), reduction)
        for got, want in zip((loss, ce, mimicry), expected, strict=True):
            torch.testing.assert_close(got, want.detach())
        (want_grad,) = torch.autograd.grad(expected[0], z, grad_scale.expand_as(expected[0]))
        torch.testing.assert_close(grad, want_grad)


def _op_arguments(**changes):
    """fused_mutual_loss's arguments by name, for float64 logits and reduction "mean", changed."""
    logits, target = make_inputs(2, 4, 5)
    schema = torch.ops.fastdml.fused_mutual_loss.default._schema
    problem = make_problem(logits, target, LossOptions())
    arguments = fused_arguments(problem, "mean")
    return {a.name: v for a, v in zip(schema.arguments, arguments, strict=True)} | changes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(divergence="js"), r"unknown divergence 'js' \(expected kl, reverse_kl or jsd\)"),
        (dict(divergence="jsd", beta=1.5), r"beta must be in \[0, 1\], got 1.5"),
        (dict(beta=float("nan")), r"beta must be in \[0, 1\], got nan"),
        (dict(ce_weight=-1.0), "ce_weight must be a finite number >= 0, got -1"),
        (dict(ce_weight=float("inf")), "ce_weight must be a finite number >= 0, got inf"),
        (dict(normalizer=torch.tensor(0.0)), "normalizer must be > 0, got 0"),
        (dict(normalizer=torch.tensor(-2)), "normalizer must be > 0, got -2"),
        (
            dict(normalizer=torch.ones(2)),
            r"normalizer must be a 0-dim real tensor, got shape \[2\]",
        ),
        (dict(normalizer=torch.tensor(True)), "normalizer must be a 0-dim real tensor"),
        (dict(normalizer=torch.tensor(2.0), reduction="sum"), "reduction 'mean' only"),
    ],
)
def test_op_rejects_bad_family_arguments(fused_backend, changes, message):
    """The fused ops check the family's arguments themselves, before their kernels: for direct
    callers, and under torch.compile, where LossOptions does not check. (The normalizer's value
    is checked where it is on the CPU; on a GPU the ops read it on the device only.)"""
    device = torch.get_default_device()  # the op's
    if device.type == "cuda" and "must be > 0" in message:
        pytest.skip("a normalizer on a GPU is read by the kernels only")
    changes = {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in changes.items()
    }
    with pytest.raises(ValueError, match=message):
        fused_op(fused_backend)(**_op_arguments(**changes))


@pytest.mark.parametrize("normalizer", [12.0, torch.tensor(12)], ids=["number", "tensor"])
def test_compile_fullgraph(fused_backend, normalizer):
    """The family's options in one graph: the op and its fake kernel take them all."""
    torch._dynamo.reset()
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(torch.get_default_device())
    criterion = MutualLoss(
        temperature=2.0,
        divergence="jsd",
        beta=0.3,
        ce_weight=0.5,
        mimic_unlabeled=True,
        normalizer=normalizer,
        backend=fused_backend,
    )
    logits, target = make_inputs(3, 16, 10, dtype=torch.float32)
    results = []
    for form in (criterion, torch.compile(criterion, fullgraph=True)):
        z = logits.clone().requires_grad_()
        loss = form(z, target)
        loss.backward()
        results.append((loss, z.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_normalizer_on_the_gpu_costs_no_host_sync(request, backend):
    """A normalizer on the GPU (a trainer's num_items_in_batch) is read by the kernels only: the
    loss's forward and backward never wait for the device."""
    on_device("cuda", backend, request)
    logits, target = make_inputs(3, 64, 100, dtype=torch.float32)
    normalizer = torch.tensor(48, device="cuda")

    def forward_and_backward():
        z = logits.clone().requires_grad_()
        mutual_loss(z, target, normalizer=normalizer, backend=backend).backward()

    forward_and_backward()  # the first call compiles and caches (Triton), which may sync
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_and_backward()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def test_naive_normalizer_matches_definition():
    """The oracle itself: mean with a normalizer is the sum divided by it."""
    peers = [torch.randn(5, 7, dtype=torch.float64) for _ in range(2)]
    target = torch.randint(0, 7, (5,))
    summed = naive_mutual_loss(peers, target, reduction="sum")[0]
    torch.testing.assert_close(naive_mutual_loss(peers, target, normalizer=4)[0], summed / 4)


def test_a_normalizer_on_another_device_is_refused():
    logits, target = make_inputs(2, 4, 5)
    with pytest.raises(ValueError, match="normalizer is on meta but the logits are on cpu"):
        mutual_loss(logits, target, normalizer=torch.tensor(2.0, device="meta"))
