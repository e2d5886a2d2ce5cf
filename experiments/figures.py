"""The report's plots: accuracy against cohort size, training loss against weight noise."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastdml.cohort.plots import new_figure


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cohort_size(
    curves: Mapping[str, Sequence[tuple[int, Sequence[float], Sequence[float]]]], path: Path
) -> None:
    """Mean peer accuracy and ensemble accuracy against K, per training mode; error bars are
    the std over seeds. `curves[mode]` holds (K, per-seed mean peer, per-seed ensemble)."""
    figure, (peer_axes, ensemble_axes) = new_figure(2)
    for mode, points in curves.items():
        for axes, index in ((peer_axes, 1), (ensemble_axes, 2)):
            stats = [_mean_std(point[index]) for point in points]
            axes.errorbar(
                [point[0] for point in points],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                label=mode,
            )
    for axes, title in ((peer_axes, "mean peer"), (ensemble_axes, "ensemble of the cohort")):
        axes.set(xlabel="cohort size K", ylabel="test accuracy (%)", title=title)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=110)


def perturbation(
    sigmas: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: Path,
) -> None:
    """Training loss against the std of the weight noise, a panel per pair; `curves[pair][arm]`
    holds one curve over `sigmas` per seed (the band is the std over seeds)."""
    figure, panels = new_figure(len(curves))
    for axes, (pair, arms) in zip(panels, curves.items(), strict=True):
        for arm, per_seed in arms.items():
            stats = [_mean_std(column) for column in zip(*per_seed, strict=True)]
            mean = [m for m, _ in stats]
            axes.plot(sigmas, mean, marker="o", label=arm)
            axes.fill_between(
                sigmas,
                [m - s for m, s in stats],
                [m + s for m, s in stats],
                alpha=0.2,
            )
        axes.set(xlabel="std of the Gaussian weight noise σ", ylabel="training loss", title=pair)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=110)
