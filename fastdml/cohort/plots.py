"""PNG plots of training curves, drawn on matplotlib's Agg canvas (no display, no pyplot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdml.data import require

Record = Mapping[str, Any]


def new_figure(panels: int) -> tuple[Any, list[Any]]:
    """A figure of `panels` side-by-side axes, for `figure.savefig`."""
    figure_module = require("matplotlib.figure", "matplotlib")
    figure = figure_module.Figure(figsize=(5.5 * panels, 4.0), layout="constrained")
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def _peers(history: Sequence[Record]) -> list[str]:
    return sorted(
        {key.split("/")[1] for key in history[0] if key.startswith("test_acc/peer")},
        key=lambda name: int(name.removeprefix("peer")),
    )


def plot_history(history: Sequence[Record], path: str | Path, title: str = "") -> None:
    """Accuracy and loss per epoch of each peer (train dotted, test solid) and the ensemble."""
    if not history or "test_acc/ensemble" not in history[0]:
        return  # nothing evaluated: no curves to draw
    figure, (acc_axes, loss_axes) = new_figure(2)
    epochs = [record["epoch"] for record in history]
    for i, peer in enumerate(_peers(history)):
        colour = f"C{i}"
        for axes, metric in ((acc_axes, "acc"), (loss_axes, "loss")):
            axes.plot(epochs, [r[f"test_{metric}/{peer}"] for r in history], colour, label=peer)
            if f"train_{metric}/{peer}" in history[0]:
                train = [r[f"train_{metric}/{peer}"] for r in history]
                axes.plot(epochs, train, colour, linestyle=":", alpha=0.7)
    for axes, metric in ((acc_axes, "acc"), (loss_axes, "loss")):
        ensemble = [r[f"test_{metric}/ensemble"] for r in history]
        axes.plot(epochs, ensemble, "k", linewidth=2, label="ensemble")
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    acc_axes.set_title("top-1 accuracy (%): test solid, train dotted")
    loss_axes.set_title("loss: test cross-entropy solid, train total loss dotted")
    acc_axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


# A line style and marker per mode: a curve drawn over an identical one (dml_e takes dml's
# steps) still shows the one under it through its gaps and by its markers.
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"))


def plot_comparison(histories: Mapping[str, Sequence[Sequence[Record]]], path: str | Path) -> Any:
    """Test accuracy per epoch of each training mode: the peers' mean and the ensemble, the mean
    over seeds with the seeds' min to max shaded. A mode whose curve is another's exactly says so
    in the legend. Returns the figure."""
    figure, (peer_axes, ensemble_axes) = new_figure(2)
    drawn: dict[Any, list[tuple[str, list[float]]]] = {peer_axes: [], ensemble_axes: []}
    seeds = 0
    for i, (mode, runs) in enumerate(histories.items()):
        if not runs or not runs[0] or "test_acc/ensemble" not in runs[0][0]:
            continue
        seeds = max(seeds, len(runs))
        epochs = [record["epoch"] for record in runs[0]]
        peers = _peers(runs[0])
        linestyle, marker = STYLES[i % len(STYLES)]
        every = max(1, len(epochs) // 12)  # about 12 markers, each mode's at its own epochs
        for axes, keys in (
            (peer_axes, [f"test_acc/{p}" for p in peers]),
            (ensemble_axes, ["test_acc/ensemble"]),
        ):
            per_seed = [[sum(r[k] for k in keys) / len(keys) for r in run] for run in runs]
            mean = [sum(values) / len(values) for values in zip(*per_seed, strict=True)]
            low = [min(values) for values in zip(*per_seed, strict=True)]
            high = [max(values) for values in zip(*per_seed, strict=True)]
            same = [other for other, curve in drawn[axes] if curve == mean]
            label = f"{mode} (same as {', '.join(same)})" if same else mode
            axes.plot(
                epochs,
                mean,
                f"C{i}",
                linestyle=linestyle,
                marker=marker,
                markevery=(i % every, every),
                markersize=7 - 1.5 * len(same),
                fillstyle="none",
                label=label,
            )
            axes.fill_between(epochs, low, high, color=f"C{i}", alpha=0.15)
            drawn[axes].append((mode, mean))
    for axes, what in ((peer_axes, "peers' mean"), (ensemble_axes, "ensemble")):
        axes.set_title(f"test accuracy, {what}")
        axes.set_xlabel("epoch")
        axes.set_ylabel("top-1 accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"lines: the mean over {seeds} seeds; shaded: the seeds' min to max")
    figure.savefig(path, dpi=100)
    return figure
