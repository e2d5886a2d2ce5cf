"""The loss family beyond the paper's: reverse KL and generalized JSD(beta), mimicry-only losses,
a global normalizer and unlabeled rows, against the naive float64 loop. Only the pure-PyTorch
backend computes them so far; the fused ones refuse them by name."""

import pytest
import torch
from naive import naive_mutual_loss
from test_mutual_loss import MODES, check_against_naive, make_inputs, mode_kwargs

from fastdml import MutualLoss, mutual_loss

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
def test_divergences_match_naive(divergence, mode, reduction, options):
    for k in (2, 3):
        logits, target = make_inputs(k, 9, 23)
        check_against_naive(
            logits,
            target,
            "torch",
            reduction=reduction,
            **mode_kwargs(mode, k),
            **divergence,
            **options,
        )


def test_jsd_endpoints_are_the_two_kls():
    """beta = 0 is KL(t || q_k) (the default divergence), beta = 1 the reverse KL."""
    logits, target = make_inputs(3, 6, 11)
    for beta, same in ((0.0, dict(divergence="kl")), (1.0, dict(divergence="reverse_kl"))):
        jsd = mutual_loss(logits, target, divergence="jsd", beta=beta, backend="torch")
        torch.testing.assert_close(jsd, mutual_loss(logits, target, backend="torch", **same))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(divergence, mode):
    """Each peer's gradient is that of its own loss with the other peers fixed (the targets are
    constants), in float64 against finite differences."""
    logits, target = make_inputs(3, 4, 7, scale=1.0)
    kwargs = dict(temperature=2.0, reduction="none", backend="torch", **divergence)
    kwargs |= mode_kwargs(mode, 3)
    for k in range(3):

        def own_loss(z_k, k=k):
            peers = [z_k if j == k else logits[j] for j in range(3)]
            return mutual_loss(peers, target, **kwargs)[k].sum()

        assert torch.autograd.gradcheck(own_loss, (logits[k].clone().requires_grad_(),))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_classes_every_peer_masks(divergence):
    """Classes that every peer masks with -inf logits add nothing; the rest as without them."""
    logits, target = make_inputs(3, 6, 11)
    target[target >= 9] = 0
    logits[:, :, 9:] = float("-inf")
    check_against_naive(logits, target, "torch", temperature=2.0, **divergence)
    finite = mutual_loss(logits[:, :, :9], target, backend="torch", temperature=2.0, **divergence)
    masked = mutual_loss(logits, target, backend="torch", temperature=2.0, **divergence)
    torch.testing.assert_close(masked, finite)


@pytest.mark.parametrize("divergence", [dict(divergence="kl"), *DIVERGENCES[:2]])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mimicry_only(divergence, reduction):
    """ce_weight = 0: the loss is the mimicry alone; without a target every row counts, with one
    the ignored rows are masked."""
    logits, target = make_inputs(3, 8, 13)
    kwargs = dict(ce_weight=0.0, reduction=reduction, temperature=2.0, **divergence)
    check_against_naive(logits, None, "torch", **kwargs)
    check_against_naive(logits, target, "torch", **kwargs)
    full = mutual_loss(logits, None, backend="torch", return_components=True, **kwargs)
    assert not full.ce.any()


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 2.0])
def test_ce_weight(ce_weight):
    logits, target = make_inputs(2, 8, 13)
    check_against_naive(logits, target, "torch", ce_weight=ce_weight, temperature=2.0)


@pytest.mark.parametrize("normalizer", [37, 2.5, torch.tensor(37), torch.tensor(9.0)])
@pytest.mark.parametrize("mimic_unlabeled", [False, True])
def test_normalizer(normalizer, mimic_unlabeled):
    """The sum over peers and rows divided by the normalizer, for both terms."""
    logits, target = make_inputs(3, 8, 13)
    kwargs = dict(normalizer=normalizer, mimic_unlabeled=mimic_unlabeled, divergence="jsd")
    check_against_naive(logits, target, "torch", **kwargs)
    summed = mutual_loss(logits, target, backend="torch", reduction="sum", **kwargs | dict(
        normalizer=None))  # fmt: skip
    got = mutual_loss(logits, target, backend="torch", **kwargs)
    torch.testing.assert_close(got, summed / float(normalizer))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_mimic_unlabeled(mode, reduction):
    """Unlabeled rows keep their mimicry term, not their cross-entropy: "mean" averages each term
    over the rows it covers."""
    logits, target = make_inputs(3, 8, 13, ignore_every=2)
    kwargs = dict(mimic_unlabeled=True, reduction=reduction, **mode_kwargs(mode, 3))
    out = check_against_naive(logits, target, "torch", **kwargs)
    if reduction == "none":
        unlabeled = target == -100
        assert not out.ce[:, unlabeled].any() and out.mimicry[:, unlabeled].all()


def test_defaults_give_the_paper_loss():
    """The new options at their defaults change nothing."""
    logits, target = make_inputs(3, 8, 13)
    explicit = dict(divergence="kl", ce_weight=1.0, normalizer=None, mimic_unlabeled=False)
    for backend in ("torch", "cpp"):
        torch.testing.assert_close(
            mutual_loss(logits, target, backend=backend, **explicit),
            mutual_loss(logits, target, backend=backend),
        )


def test_alpha_as_a_tensor():
    logits, target = make_inputs(2, 8, 13)
    got = mutual_loss(logits, target, alpha=torch.tensor(0.25))
    torch.testing.assert_close(got, mutual_loss(logits, target, alpha=0.25))
    assert MutualLoss(alpha=torch.tensor(0.25, dtype=torch.float64)).alpha == 0.25


def test_auto_picks_the_pure_pytorch_backend():
    logits, target = make_inputs(2, 8, 13)
    got = mutual_loss(logits, target, divergence="reverse_kl")
    torch.testing.assert_close(
        got, mutual_loss(logits, target, divergence="reverse_kl", backend="torch")
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


@pytest.mark.parametrize(
    "options",
    [
        dict(divergence="reverse_kl"),
        dict(divergence="jsd"),
        dict(ce_weight=0.5),
        dict(normalizer=3),
        dict(mimic_unlabeled=True),
    ],
)
def test_fused_backends_refuse_what_they_do_not_compute(options):
    logits, target = make_inputs(2, 4, 5)
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"backend='cpp' does not compute {name}"):
        mutual_loss(logits, target, backend="cpp", **options)


def test_naive_normalizer_matches_definition():
    """The oracle itself: mean with a normalizer is the sum divided by it."""
    peers = [torch.randn(5, 7, dtype=torch.float64) for _ in range(2)]
    target = torch.randint(0, 7, (5,))
    summed = naive_mutual_loss(peers, target, reduction="sum")[0]
    torch.testing.assert_close(naive_mutual_loss(peers, target, normalizer=4)[0], summed / 4)
