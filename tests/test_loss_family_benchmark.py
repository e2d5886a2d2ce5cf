"""benchmarks/loss_family.py at a tiny shape: its plain and TRL formulas are the loss fastdml
computes, and a measurement runs end to end into its table (no time is judged)."""

from __future__ import annotations

import pytest

from benchmarks import candidates, cases, loss_family


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("divergence", list(loss_family.DIVERGENCES))
def test_formulas_are_the_loss(divergence, k):
    logits, _ = cases.inputs((k, 8, 50), "float32")
    options = dict(ce_weight=0.0, divergence=divergence, beta=loss_family.BETA)
    expected = candidates.reference(logits, None, **options)
    formulas = [lambda z, _: loss_family.plain_loss(z, divergence)]
    if k == 2:
        trl_beta = loss_family.DIVERGENCES[divergence]
        formulas.append(lambda z, _: loss_family.trl_mutual(z, trl_beta))
    for formula in formulas:
        candidates.check(formula, logits, None, expected)


def test_measure_and_table():
    result = loss_family.measure((2, 8, 50), "jsd", rounds=2)
    assert set(result["median_s"]) == set(loss_family.COLUMNS)
    assert all(len(times) == 2 for times in result["times_s"].values())
    table = loss_family.markdown([result])
    assert "| 2, 8, 50 | jsd |" in table
    assert len(table.splitlines()) == 3
