"""The paper-reproduction script: its statistics, and its whole pipeline on a tiny setting."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from experiments.reproduce import EXPERIMENTS
from experiments.stats import mean_std, paired

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "base, new",
    [
        ([68.1, 67.5, 69.0, 68.2, 67.9], [70.2, 69.1, 70.8, 69.5, 70.0]),  # a clear gain
        ([68.1, 67.5, 69.0, 68.2, 67.9], [68.0, 68.1, 68.7, 68.6, 67.5]),  # noise
        ([70.2, 69.1, 70.8, 69.5, 70.0], [68.1, 67.5, 69.0, 68.2, 67.9]),  # a clear loss
        ([1.0, 2.0, 3.0], [1.5, 2.4, 3.6]),
    ],
)
@pytest.mark.parametrize("better", ["higher", "lower"])
def test_verdict_is_the_two_sided_paired_t_test(base, new, better):
    result = paired(base, new, better=better)
    test = stats.ttest_rel(new, base)
    assert result.t == pytest.approx(test.statistic)
    assert result.delta == pytest.approx(sum(new) / len(new) - sum(base) / len(base))
    predicted = result.delta > 0 if better == "higher" else result.delta < 0
    if test.pvalue >= 0.05:
        assert result.verdict == "not resolved"
    else:
        assert result.verdict == ("holds" if predicted else "reversed")
    wins = sum((b > a) if better == "higher" else (b < a) for a, b in zip(base, new, strict=True))
    assert result.score() == f"{wins}/{len(base)}"


def test_formats_and_bad_arms():
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert mean_std([0.5], 3) == "0.500 ± 0.000"
    assert paired([1.0, 1.0], [1.0, 1.0]).verdict == "not resolved"
    assert paired([1.0], [2.0]).verdict == "one seed: no test"
    assert math.isinf(paired([1.0, 2.0], [2.0, 3.0]).t)
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="better must be"):
        paired([1.0], [1.0], better="more")


def _reproduce(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", "--quick", *args], cwd=ROOT, check=True
    )


def test_the_quick_setting_writes_every_section_and_reuses_its_runs(tmp_path):
    _reproduce("--out", str(tmp_path), "--workers", "2")
    report = (tmp_path / "results.md").read_text()
    for name in EXPERIMENTS:
        assert f"--only {name}`" in report
    assert "## Summary" in report and "nan" not in report
    for image in ("cohort_size.png", "perturbation.png"):
        assert (tmp_path / "results" / image).stat().st_size > 1000
    records = json.loads((tmp_path / "results" / "results.json").read_text())["records"]
    assert all(math.isfinite(r["test_acc/ensemble"]) for r in records.values())
    # the runs are read back, not trained again: the same numbers, the checkpoints untouched
    checkpoints = {path: path.stat().st_mtime_ns for path in tmp_path.glob("runs/**/*.pt")}
    again = tmp_path / "again"
    _reproduce("--only", "pairs", "--out", str(again), "--work", str(tmp_path / "runs"))
    section = report.split("## 1.")[1].split("\n## ")[0]
    assert section in (again / "results.md").read_text()
    assert checkpoints == {path: path.stat().st_mtime_ns for path in checkpoints}
