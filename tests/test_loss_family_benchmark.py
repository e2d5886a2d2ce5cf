"""benchmarks/loss_family.py and benchmarks/gpu_family.py at tiny shapes: their plain and TRL
formulas are the loss fastdml computes, and a measurement runs end to end into its table or its
records (no time is judged)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import candidates, cases, gpu_family, loss_family


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


def test_gpu_family_runs_on_the_cpu(tmp_path, monkeypatch):
    """Its --device cpu check: a record per divergence and candidate, each loss right."""
    out = tmp_path / "gpu_family.jsonl"
    argv = ["gpu_family", str(out), "--device", "cpu", "--shapes", "2,16,40", "--reps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--dtypes", "float32"])
    gpu_family.main()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    found = {(record["divergence"], record["candidate"]) for record in records}
    assert found == {
        (divergence, candidate)
        for divergence in loss_family.DIVERGENCES
        for candidate in ("fastdml_cpp", "torch_compile")
    }
    assert all(record["error"] < 1e-5 and record["median_s"] > 0 for record in records)
