"""Properties of the DML loss that hold for any input, checked with hypothesis on every backend."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdml import mutual_loss

cohorts = st.tuples(
    st.integers(2, 5),  # K peers
    st.integers(1, 6),  # N rows
    st.integers(2, 40),  # C classes
    st.floats(0.25, 8.0),  # temperature
    st.floats(0.1, 50.0),  # logit scale
    st.integers(0, 2**31 - 1),  # seed
)


def draw(k, n, c, scale, seed):
    gen = torch.Generator("cpu").manual_seed(seed)
    logits = scale * torch.randn(k, n, c, dtype=torch.float64, generator=gen, device="cpu")
    target = torch.randint(0, c, (n,), generator=gen, device="cpu")
    device = torch.get_default_device()  # CUDA for the GPU backends' tests
    return logits.to(device), target.to(device)


@settings(max_examples=40)
@given(cohorts)
def test_mimicry_vanishes_when_peers_agree(backend, cohort):
    k, n, c, temperature, scale, seed = cohort
    logits, target = draw(1, n, c, scale, seed)
    same = logits.expand(k, n, c)
    for mode in ["pairwise", "ensemble", "ensemble_logits"]:
        out = mutual_loss(
            same,
            target,
            temperature=temperature,
            mode=mode,
            return_components=True,
            backend=backend,
        )
        torch.testing.assert_close(out.mimicry, torch.zeros(k, dtype=torch.float64))
        torch.testing.assert_close(out.loss, out.ce.sum())


@settings(max_examples=40)
@given(cohorts, st.sampled_from(["pairwise", "ensemble", "ensemble_logits"]))
def test_mimicry_is_non_negative(backend, cohort, mode):
    k, n, c, temperature, scale, seed = cohort
    logits, target = draw(k, n, c, scale, seed)
    out = mutual_loss(
        logits,
        target,
        temperature=temperature,
        mode=mode,
        return_components=True,
        reduction="none",
        backend=backend,
    )
    assert (out.mimicry >= -1e-9).all()


@settings(max_examples=40)
@given(cohorts)
def test_invariant_to_a_constant_added_to_a_row(backend, cohort):
    k, n, c, temperature, scale, seed = cohort
    logits, target = draw(k, n, c, scale, seed)
    shifted = logits + 100 * torch.randn(k, n, 1, dtype=torch.float64)
    for mode in ["pairwise", "ensemble", "ensemble_logits"]:
        options = dict(temperature=temperature, mode=mode, reduction="none", backend=backend)
        torch.testing.assert_close(
            mutual_loss(shifted, target, **options), mutual_loss(logits, target, **options)
        )


@settings(max_examples=40)
@given(cohorts)
def test_pairwise_and_ensemble_share_their_gradient(backend, cohort):
    k, n, c, temperature, scale, seed = cohort
    logits, target = draw(k, n, c, scale, seed)
    grads = []
    for mode in ["pairwise", "ensemble"]:
        z = logits.clone().requires_grad_()
        mutual_loss(z, target, temperature=temperature, mode=mode, backend=backend).backward()
        grads.append(z.grad)
    torch.testing.assert_close(*grads)


@settings(max_examples=40)
@given(cohorts, st.sampled_from(["pairwise", "ensemble", "ensemble_logits"]))
def test_peers_are_exchangeable(backend, cohort, mode):
    k, n, c, temperature, scale, seed = cohort
    logits, target = draw(k, n, c, scale, seed)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed), device="cpu")
    options = dict(temperature=temperature, mode=mode, reduction="none", backend=backend)
    torch.testing.assert_close(
        mutual_loss(logits[perm], target, **options), mutual_loss(logits, target, **options)[perm]
    )
