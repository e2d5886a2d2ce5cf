"""Runs of the reproduction: a configuration trained once per seed in its own folder, and the
pool of worker processes that trains and measures them.

A finished run's folder is read back, not trained again, and an interrupted one resumes, so a
second call of the experiments only redraws the report.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from fastdml.analysis import perturbed_loss, posterior_entropy
from fastdml.cli.config import make_config
from fastdml.cli.runs import load_data, make_trainer, peer_model
from fastdml.cohort.checkpoint import load_checkpoint, load_peer_weights
from fastdml.cohort.trainer import CHECKPOINT


@dataclass(frozen=True)
class Setting:
    """How much to run: the full study, or a tiny one that only checks the pipeline."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 60
    train_samples: int | None = None
    cohort_sizes: tuple[int, ...] = (1, 2, 3, 4, 5)
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    epoch_grid: tuple[int, ...] = (20, 60, 120)
    sigmas: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1)
    draws: int = 5


@dataclass(frozen=True)
class Run:
    """One configuration, trained once per seed in ``work/<name>/seed<s>``."""

    name: str
    options: dict[str, Any] = field(compare=False)
    teacher: str | None = None  # the run whose peer 0, of the same seed, is the frozen teacher


def label(entry: str | dict[str, Any]) -> str:
    """A peer's name in folders and tables: its architecture and options, e.g. cnn1d-64."""
    if isinstance(entry, str):
        return entry
    extra = "".join(f"-{v}" for k, v in sorted(entry.items()) if k != "arch")
    return entry["arch"] + extra


def cohort(
    setting: Setting,
    peers: Sequence[str | dict[str, Any]],
    mode: str = "dml",
    *,
    dataset: str = "mnist1d",
    teacher: str | None = None,
    **options: Any,
) -> Run:
    """The run of `peers` trained in `mode`; options other than the defaults name its folder."""
    options = {"epochs": setting.epochs, **options}
    variant = "".join(f",{k}={v}" for k, v in sorted(options.items()) if k != "epochs")
    epochs = "" if options["epochs"] == setting.epochs else f",epochs={options['epochs']}"
    return Run(
        f"{dataset}/{'+'.join(label(p) for p in peers)}/{mode}{variant}{epochs}",
        {
            "dataset": dataset,
            "peers": list(peers),
            "mode": mode,
            "train_samples": setting.train_samples if dataset == "mnist1d" else None,
            **options,
        },
        teacher,
    )


def _folder(work: Path, run: Run, seed: int) -> Path:
    return work / run.name / f"seed{seed}"


def _train(options: dict[str, Any], out: str) -> dict[str, Any]:
    """Trains one run (or reads it back); its last record and its training time."""
    resume = (Path(out) / CHECKPOINT).is_file()
    config = make_config(options, {"out": out, "resume": resume})
    trainer = make_trainer(config, load_data(config), progress=False)
    done = trainer.epoch
    history = trainer.run()
    return {
        **history[-1],
        "train_seconds_total": sum(r["train_seconds"] for r in history),
        "trained_now": trainer.epoch > done,
    }


def _analyse(options: dict[str, Any], out: str, setting: Setting) -> dict[str, Any]:
    """Each trained peer's posterior entropy on the training data and its training loss under
    Gaussian weight noise (mean over the draws, per sigma)."""
    config = make_config(options, {"out": out})
    data = load_data(config)
    entropy, perturbed = [], []
    for k, entry in enumerate(config.peers):
        model = peer_model(entry, data)
        model.load_state_dict(load_peer_weights(Path(out) / CHECKPOINT, k))
        entropy.append(posterior_entropy(model, data.train))
        losses = perturbed_loss(model, data.train, setting.sigmas, draws=setting.draws, seed=k)
        perturbed.append(losses.mean(1).tolist())
    return {"train_entropy": entropy, "perturbed_loss": perturbed}


def _start_worker() -> None:
    torch.set_num_threads(1)


class Results:
    """Every run's last record (and measurements) by (run name, seed)."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self.analyses: dict[tuple[str, int], dict[str, Any]] = {}
        self.identical: dict[tuple[str, str], bool] = {}

    def values(self, run: Run, column: str) -> list[float]:
        """`column` of the last record (e.g. "test_acc/ensemble"), per seed."""
        return [self.records[(run.name, seed)][column] for seed in self.setting.seeds]

    def peers(self, run: Run, metric: str = "test_acc", arch: str | None = None) -> list[float]:
        """A per-peer `metric` of the last record (e.g. "test_entropy"), per seed: the mean over
        the trained peers, or over those of architecture `arch`."""
        ks = _peers_of(run, arch)
        return [
            statistics.fmean(self.records[(run.name, seed)][f"{metric}/peer{k}"] for k in ks)
            for seed in self.setting.seeds
        ]

    def analysed(self, run: Run, what: str, arch: str | None = None) -> list[Any]:
        """A measurement of `_analyse`, per seed: the mean over the peers (of `arch`), element
        by element for curves."""
        out = []
        for seed in self.setting.seeds:
            values = [self.analyses[(run.name, seed)][what][k] for k in _peers_of(run, arch)]
            if isinstance(values[0], list):
                out.append([statistics.fmean(column) for column in zip(*values, strict=True)])
            else:
                out.append(statistics.fmean(values))
        return out


def _peers_of(run: Run, arch: str | None) -> list[int]:
    peers = run.options["peers"]
    return [k for k, entry in enumerate(peers) if arch is None or label(entry) == arch]


def execute(
    runs: Sequence[Run],
    analyse: Sequence[Run],
    compare_weights: Sequence[tuple[Run, Run]],
    *,
    setting: Setting,
    work: Path,
    workers: int,
) -> Results:
    """Trains every run for every seed (teachers before their students), then measures the runs
    in `analyse`."""
    results = Results(setting)
    unique = list(dict.fromkeys(runs))
    by_name = {run.name: run for run in unique}
    waves = [[r for r in unique if r.teacher is None], [r for r in unique if r.teacher]]
    with ProcessPoolExecutor(workers, get_context("spawn"), initializer=_start_worker) as pool:
        for wave in waves:
            jobs = {}
            for run in sorted(wave, key=_cost, reverse=True):  # the longest first
                for seed in setting.seeds:
                    options = {**run.options, "seed": seed}
                    if run.teacher:
                        teacher = _folder(work, by_name[run.teacher], seed) / CHECKPOINT
                        arch = by_name[run.teacher].options["peers"][0]
                        arch = {"arch": arch} if isinstance(arch, str) else arch
                        options["teacher"] = {**arch, "checkpoint": str(teacher)}
                    out = str(_folder(work, run, seed))
                    jobs[(run.name, seed)] = pool.submit(_train, options, out)
            for key, job in jobs.items():
                results.records[key] = job.result()
        jobs = {
            (run.name, seed): pool.submit(
                _analyse, {**run.options, "seed": seed}, str(_folder(work, run, seed)), setting
            )
            for run in dict.fromkeys(analyse)
            for seed in setting.seeds
        }
        for key, job in jobs.items():
            results.analyses[key] = job.result()
    for a, b in compare_weights:
        results.identical[(a.name, b.name)] = all(
            _same_weights(_folder(work, a, seed), _folder(work, b, seed)) for seed in setting.seeds
        )
    return results


def _cost(run: Run) -> int:
    return len(run.options["peers"]) * run.options["epochs"]


def _same_weights(a: Path, b: Path) -> bool:
    peers_a = load_checkpoint(a / CHECKPOINT)["cohort"]["peers"]
    peers_b = load_checkpoint(b / CHECKPOINT)["cohort"]["peers"]
    return all(
        torch.equal(x[name], y[name]) for x, y in zip(peers_a, peers_b, strict=True) for name in x
    )
