"""Training modes side by side: independent vs DML vs DML_e (and distillation) over seeds.

For each seed every mode starts from the same initial weights and sees the same batches; only
the mimicry differs. Distillation needs a teacher: one loaded from a checkpoint, or one trained
alone first, per seed, and loaded back from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdml.cli.config import TEACHER_KEYS, TRAINING_MODES, RunConfig, make_config
from fastdml.cli.runs import load_data, make_trainer
from fastdml.cohort.plots import plot_comparison
from fastdml.cohort.trainer import CHECKPOINT
from fastdml.errors import ConfigError, UserError

DEFAULT_MODES = ("independent", "dml", "dml_e")
TEACHER = "teacher"  # the folder of the teachers trained for distillation


def _final_accuracies(history: Sequence[dict[str, Any]], num_students: int) -> dict[str, float]:
    last = history[-1]
    accuracies = {f"peer{k}": last[f"test_acc/peer{k}"] for k in range(num_students)}
    accuracies["ensemble"] = last["test_acc/ensemble"]
    if f"test_acc/peer{num_students}" in last:  # a frozen teacher
        accuracies[TEACHER] = last[f"test_acc/peer{num_students}"]
    return accuracies


def _teacher_config(config: RunConfig, teacher: dict[str, Any], seed: int, out: Path) -> RunConfig:
    """A teacher trained alone with the students' optimizer settings (its own where it has
    them, else the run's, the first peer's for per-peer lists)."""
    teacher = {k: v for k, v in teacher.items() if k not in TEACHER_KEYS or k == "arch"}
    per_peer = {}
    for name in ("lr", "momentum", "weight_decay", "clip_norm", "lr_schedule"):
        value = getattr(config, name)
        per_peer[name] = value[0] if isinstance(value, list) else value
    return make_config(
        config.to_dict(),
        per_peer,
        {
            "peers": [teacher],
            "teacher": None,
            "mode": "independent",
            "seed": seed,
            "out": str(out / TEACHER / f"seed{seed}"),
        },
    )


def compare(
    config: RunConfig,
    *,
    modes: Sequence[str] = DEFAULT_MODES,
    seeds: Sequence[int] = (0, 1, 2),
    teacher: dict[str, Any] | None = None,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains `config` in each mode for each seed under `out`/<mode>/seed<s>; writes
    results.json and compare.png there and returns the results.

    `teacher` (a `make_teacher` entry) is what mode "distill" learns from: loaded from its
    checkpoint, or, without one, trained alone first for each seed under `out`/teacher/seed<s>.
    """
    modes, seeds, out = list(modes), list(seeds), Path(out)
    unknown = [m for m in modes if m not in TRAINING_MODES]
    if unknown or not modes:
        raise ConfigError(f"modes must be some of {', '.join(TRAINING_MODES)}, got {modes}")
    if not seeds:
        raise ConfigError("compare needs at least one seed")
    if "distill" in modes and teacher is None:
        raise ConfigError("mode 'distill' needs a teacher: give --teacher ARCH")
    if "distill" in modes and config.stacked:
        raise ConfigError(
            "mode 'distill' learns from a frozen teacher, which a stacked cohort cannot hold: "
            "leave out --stacked or the distill mode"
        )
    if config.teacher is not None:
        raise ConfigError("compare trains the peers alone; pass the teacher apart, to distill")
    if teacher is not None and not teacher["frozen"]:
        raise ConfigError("compare uses a teacher only to distill from; it cannot be trainable")
    if not resume and any(out.glob(f"*/*/{CHECKPOINT}")):
        raise UserError(f"{out} holds an earlier comparison: add --resume, or choose another --out")
    data = load_data(config)
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    histories: dict[str, list[list[dict[str, Any]]]] = {mode: [] for mode in modes}
    for seed in seeds:
        seed_teacher = teacher
        if "distill" in modes and not teacher["checkpoint"]:
            teacher_run = _teacher_config(config, teacher, seed, out)
            trainer = make_trainer(
                dataclasses.replace(teacher_run, resume=_exists(teacher_run.out, resume)),
                data,
                progress=progress,
                name=f"teacher seed {seed}",
            )
            trainer.run()
            seed_teacher = {**teacher, "checkpoint": str(trainer.checkpoint_path)}
        for mode in modes:
            run_out = out / mode / f"seed{seed}"
            run_config = make_config(
                config.to_dict(),
                {
                    "mode": mode,
                    "seed": seed,
                    "out": str(run_out),
                    "resume": _exists(run_out, resume),
                    "teacher": seed_teacher if mode == "distill" else None,
                },
            )
            trainer = make_trainer(run_config, data, progress=progress, name=f"{mode} seed {seed}")
            history = trainer.run()
            histories[mode].append(history)
            runs[mode].append(
                {
                    "seed": seed,
                    "folder": str(run_out),
                    "test_acc": _final_accuracies(history, len(config.peers)),
                }
            )
    results = {
        "config": config.to_dict(),
        "modes": modes,
        "seeds": seeds,
        "runs": runs,
        "summary": {mode: _summary(runs[mode]) for mode in modes},
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        plot_comparison(histories, out / "compare.png")
    except UserError as error:
        warnings.warn(f"no plots: {error}", stacklevel=2)
    return results


def _exists(folder: str | Path, resume: bool) -> bool:
    return resume and (Path(folder) / CHECKPOINT).is_file()


def _summary(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    columns = runs[0]["test_acc"].keys()
    summary = {}
    for column in columns:
        values = [run["test_acc"][column] for run in runs]
        summary[column] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return summary


def format_table(results: dict[str, Any]) -> str:
    """The final test accuracies as a table: mean ± std over the seeds, a row per mode."""
    summary = results["summary"]
    columns: list[str] = []
    for mode in results["modes"]:
        columns += [c for c in summary[mode] if c not in columns and c != TEACHER]
    if any(TEACHER in summary[mode] for mode in results["modes"]):
        columns.append(TEACHER)
    config = results["config"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    peers = ", ".join(entry["arch"] for entry in config["peers"])
    lines = [
        f"test accuracy (%) on {config['dataset']} after {config['epochs']} epochs, "
        f"peers {peers}; mean ± std over seeds {seeds}",
        f"{'mode':<12}" + "".join(f"{c:>16}" for c in columns),
    ]
    for mode in results["modes"]:
        cells = []
        for column in columns:
            stat = summary[mode].get(column)
            cells.append(f"{stat['mean']:>9.2f} ± {stat['std']:4.2f}" if stat else f"{'-':>16}")
        lines.append(f"{mode:<12}" + "".join(cells))
    if {"dml", "dml_e"} <= set(results["modes"]):
        lines += [
            "dml_e takes the same steps as dml: the KL to the other peers' mean probability has",
            "the gradient of the mean pairwise KL (dml_logits is the sharper ensemble target)",
        ]
    return "\n".join(lines)
