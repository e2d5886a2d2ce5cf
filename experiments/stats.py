"""Numbers over seeds: a mean with its spread, and the paired difference of two arms.

Two arms run with the same seed start from the same initial weights and see the same batches, so
their difference per seed removes most of the seed-to-seed noise; a claim "holds" when the mean
difference is significant at the 5% level in a two-sided paired t-test over the seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"68.67 ± 0.67"``: the mean and the sample standard deviation over seeds."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"


@dataclass(frozen=True)
class Paired:
    """`new - base` over seeds; `better` says which sign the claim under test predicts."""

    base: tuple[float, ...]
    new: tuple[float, ...]
    better: str  # "higher" or "lower"

    @property
    def differences(self) -> tuple[float, ...]:
        return tuple(b - a for a, b in zip(self.base, self.new, strict=True))

    @property
    def delta(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else 0.0

    @property
    def wins(self) -> int:
        sign = 1 if self.better == "higher" else -1
        return sum(sign * d > 0 for d in self.differences)

    @property
    def t(self) -> float:
        n = len(self.differences)
        if n < 2:
            return math.nan
        if self.spread == 0:
            return 0.0 if self.delta == 0 else math.copysign(math.inf, self.delta)
        return self.delta / (self.spread / math.sqrt(n))

    @property
    def verdict(self) -> str:
        n = len(self.differences)
        if n < 2:
            return "one seed: no test"
        critical = float(stats.t.ppf(0.975, n - 1))
        t = self.t if self.better == "higher" else -self.t
        if t > critical:
            return "holds"
        if t < -critical:
            return "reversed"
        return "not resolved"

    def cell(self, digits: int = 2) -> str:
        """``"+2.13 ± 0.61"``: the mean difference and its spread over seeds."""
        return f"{self.delta:+.{digits}f} ± {self.spread:.{digits}f}"

    def score(self) -> str:
        """``"5/5"``: in how many seeds the difference has the predicted sign."""
        return f"{self.wins}/{len(self.differences)}"

    def describe(self, unit: str = "points", digits: int = 2) -> str:
        """The effect against the seed-to-seed spread of the baseline, for a summary."""
        spread = statistics.stdev(self.base) if len(self.base) > 1 else 0.0
        return (
            f"{self.cell(digits)}{' ' + unit if unit else ''} "
            f"(baseline's std over seeds {spread:.{digits}f}); "
            f"{'higher' if self.better == 'higher' else 'lower'} in {self.score()} seeds"
        )


def paired(base: Sequence[float], new: Sequence[float], *, better: str = "higher") -> Paired:
    if len(base) != len(new) or not base:
        raise ValueError(f"paired arms need the same seeds, got {len(base)} and {len(new)} values")
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    return Paired(tuple(base), tuple(new), better)
