"""Reproduces the findings of Deep Mutual Learning (Zhang et al., CVPR 2018) on embedded data.

    python -m experiments.reproduce                          # everything: docs/results.md
    python -m experiments.reproduce --only pairs,modes       # some experiments
    python -m experiments.reproduce --quick --out /tmp/dml   # a tiny setting (what CI runs)

Each run trains in its own folder under --work (see experiments/runner.py); runs go to --workers
processes of one thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.machine import describe
from experiments import figures
from experiments.runner import Results, Run, Setting, cohort, execute, label
from experiments.stats import Paired, mean_std, paired

ROOT = Path(__file__).resolve().parents[1]
NOTES = Path(__file__).with_name("notes.md")  # copied into the full report verbatim
STUDENT = "mlp"
LARGE = {"arch": "cnn1d", "channels": 64}  # the large network of the distillation experiment


FULL = Setting()
QUICK = Setting(
    seeds=(0, 1),
    epochs=2,
    train_samples=256,
    cohort_sizes=(1, 2, 3),
    alphas=(0.5, 1.0),
    temperatures=(1.0, 2.0),
    epoch_grid=(1, 2),
    sigmas=(0.0, 0.05),
    draws=2,
)


# ---------------------------------------------------------------------------------------------
# The experiments: the runs each needs, and its section of the report


@dataclass
class Section:
    """An experiment's part of the report, and its lines in the summary."""

    title: str
    text: str
    claims: list[tuple[str, str, str]]  # (claim, measured, verdict) for the summary
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)


PAIRS = (("mlp", "mlp"), ("cnn1d", "cnn1d"), ("mlp", "cnn1d"))


def pair_runs(s: Setting) -> list[Run]:
    runs = [cohort(s, pair, mode) for pair in PAIRS for mode in ("independent", "dml")]
    runs += [cohort(s, ("mlp", "mlp"), mode, dataset="digits") for mode in ("independent", "dml")]
    return runs


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _networks(run: Run) -> list[str]:
    return list(dict.fromkeys(label(p) for p in run.options["peers"]))


def _shown(network: str, pair: Sequence[str]) -> str:
    return f"{network} (x2)" if pair.count(network) == 2 else network


def _comparison_row(
    results: Results, base: Run, new: Run, network: str
) -> tuple[list[str], Paired]:
    """Test accuracy of `network` ("peers" for all, "ensemble", or an architecture) in two
    arms: the table cells and the paired difference."""
    if network == "ensemble":
        a, b = results.values(base, "test_acc/ensemble"), results.values(new, "test_acc/ensemble")
    else:
        arch = None if network == "peers" else network
        a, b = results.peers(base, arch=arch), results.peers(new, arch=arch)
    difference = paired(a, b)
    cells = [mean_std(a), mean_std(b), difference.cell(), difference.score(), difference.verdict]
    return cells, difference


def pairs_section(r: Results) -> Section:
    s = r.setting
    rows, claims = [], []
    for dataset, pair in [("mnist1d", p) for p in PAIRS] + [("digits", ("mlp", "mlp"))]:
        base = cohort(s, pair, "independent", dataset=dataset)
        dml = cohort(s, pair, "dml", dataset=dataset)
        for network in _networks(dml) + ["ensemble"]:
            cells, difference = _comparison_row(r, base, dml, network)
            rows.append([dataset, " + ".join(pair), _shown(network, pair), *cells])
            if network != "ensemble":
                claims.append(
                    (
                        f"DML beats independent: {network} in {'+'.join(pair)} ({dataset})",
                        difference.describe(),
                        difference.verdict,
                    )
                )
    text = _table(
        [
            "data",
            "pair",
            "network",
            "independent",
            "DML",
            "DML − independent",
            "DML better",
            "verdict",
        ],
        rows,
    )
    return Section(
        "1. Independent training vs DML for pairs",
        "Test accuracy (%) after the last epoch. Homogeneous pairs show the mean of their two "
        "peers (x2); the ensemble averages the peers' probabilities. Independent pairs are the "
        "same two networks trained with alpha = 0: the same initial weights and batches as the "
        "DML pair of the same seed.\n\n" + text,
        claims,
    )


def size_runs(s: Setting) -> list[Run]:
    runs = [cohort(s, ["mlp"] * k, "dml" if k > 1 else "independent") for k in s.cohort_sizes]
    return runs + [cohort(s, ["mlp"] * k, "independent") for k in s.cohort_sizes if k > 1]


def size_section(r: Results) -> Section:
    s = r.setting
    rows, curves = [], {"DML": [], "independent": []}
    for k in s.cohort_sizes:
        dml = cohort(s, ["mlp"] * k, "dml" if k > 1 else "independent")
        alone = cohort(s, ["mlp"] * k, "independent")
        peers = r.peers(dml)
        within = [
            statistics.pstdev(r.records[(dml.name, seed)][f"test_acc/peer{j}"] for j in range(k))
            for seed in s.seeds
        ]
        row = [str(k), mean_std(peers), f"{statistics.fmean(within):.2f}"]
        row += [mean_std(r.values(dml, "test_acc/ensemble"))]
        if k > 1:
            row += [mean_std(r.peers(alone)), mean_std(r.values(alone, "test_acc/ensemble"))]
        else:
            row += ["–", "–"]
        rows.append(row)
        curves["DML"].append((k, peers, r.values(dml, "test_acc/ensemble")))
        curves["independent"].append((k, r.peers(alone), r.values(alone, "test_acc/ensemble")))
    sizes = [k for k in s.cohort_sizes if k > 1]
    alone = cohort(s, ["mlp"], "independent")
    smallest, largest = (cohort(s, ["mlp"] * k, "dml") for k in (sizes[0], sizes[-1]))
    largest_alone = cohort(s, ["mlp"] * sizes[-1], "independent")
    claims = [
        (f"mean peer accuracy: one network alone → K = {sizes[-1]}", alone, largest, "peers"),
        (f"mean peer accuracy: K = {sizes[0]} → K = {sizes[-1]}", smallest, largest, "peers"),
        (f"K = {sizes[-1]}: DML ensemble vs its mean peer", None, largest, "ensemble"),
        (
            f"K = {sizes[-1]}: DML ensemble vs the ensemble of K networks trained alone",
            largest_alone,
            largest,
            "ensemble",
        ),
    ]
    tested = []
    for claim, base, new, network in claims:
        if base is None:
            difference = paired(r.peers(new), r.values(new, "test_acc/ensemble"))
        else:
            difference = _comparison_row(r, base, new, network)[1]
        tested.append((claim, difference.describe(), difference.verdict))
    text = _table(
        [
            "K",
            "mean peer (DML)",
            "spread among peers",
            "ensemble (DML)",
            "mean peer (independent)",
            "ensemble (independent)",
        ],
        rows,
    )
    return Section(
        "2. Cohort size",
        "MLP cohorts of K peers on MNIST-1D; K = 1 is one network alone. "
        "Mean peer: the mean test accuracy of the K peers, mean ± std over seeds (the std is "
        "the spread over seeds). Spread among peers: the std of the K peers' accuracies within "
        "a run, averaged over seeds. The independent cohorts are K networks trained alone from "
        "the same initial weights as the DML cohort's.\n\n" + text,
        tested,
        {"cohort_size.png": lambda path: figures.cohort_size(curves, path)},
    )


MODES = ("dml", "dml_e", "dml_logits")
TRIO = ("mlp",) * 3  # with two peers the three modes coincide: the ensemble of one is that one


def mode_runs(s: Setting) -> list[Run]:
    return [cohort(s, TRIO, mode) for mode in MODES]


def modes_section(r: Results) -> Section:
    s = r.setting
    dml = cohort(s, TRIO, "dml")
    rows, claims = [], []
    for mode in MODES:
        run = cohort(s, TRIO, mode)
        peers, ensemble = r.peers(run), r.values(run, "test_acc/ensemble")
        row = [mode, mean_std(peers), mean_std(ensemble)]
        if mode == "dml":
            row += ["–", "–", "–"]
        else:
            difference = paired(peers, r.peers(dml))  # > 0: the pairwise form wins
            same = r.identical[(dml.name, run.name)]
            row += [difference.cell(), difference.score(), "yes" if same else "no"]
            claims.append(
                (
                    f"pairwise DML beats {mode}",
                    difference.describe() + ("; identical weights" if same else ""),
                    "equal by construction" if same else difference.verdict,
                )
            )
        rows.append(row)
    text = _table(
        ["mode", "mean peer", "ensemble", "DML − mode", "DML better", "weights identical to DML"],
        rows,
    )
    return Section(
        "3. Pairwise DML vs the ensemble teacher",
        "Cohorts of three MLPs on MNIST-1D (with two peers the three modes are one: the "
        "ensemble of the other peers is the other peer). `dml_e` is the paper's DML_e: each "
        "peer mimics the mean of the other peers' probabilities. With probability averaging "
        "its gradient, alpha·T·(q_k − mean of the others' q), is the gradient of the mean "
        "pairwise KL, so its runs take the very same steps as DML; only the logged mimicry "
        "value differs. The last column checks that on the final weights, bit for bit. "
        "`dml_logits` mimics the softmax of the others' mean logits, a sharper ensemble target "
        "with a different gradient.\n\n" + text,
        claims,
    )


def distill_runs(s: Setting) -> list[Run]:
    teacher = cohort(s, [LARGE], "independent")
    return [
        cohort(s, [STUDENT], "independent"),
        teacher,
        cohort(s, [STUDENT], "distill", teacher=teacher.name),
        cohort(s, [STUDENT, LARGE], "dml"),
    ]


def distill_section(r: Results) -> Section:
    alone, large, distilled, mutual = distill_runs(r.setting)
    student = r.values(alone, "test_acc/peer0")
    arms = [
        ("student trained alone", student, None),
        ("large network trained alone (the teacher)", None, r.values(large, "test_acc/peer0")),
        (
            "student distilled from the pre-trained large network",
            r.values(distilled, "test_acc/peer0"),
            None,
        ),
        (
            "DML: student with the untrained large network",
            r.values(mutual, "test_acc/peer0"),
            r.values(mutual, "test_acc/peer1"),
        ),
    ]
    rows = [[name, mean_std(a) if a else "–", mean_std(b) if b else "–"] for name, a, b in arms]
    versus = paired(r.values(distilled, "test_acc/peer0"), r.values(mutual, "test_acc/peer0"))
    versus_alone = paired(student, r.values(distilled, "test_acc/peer0"))
    large_gain = paired(r.values(large, "test_acc/peer0"), r.values(mutual, "test_acc/peer1"))
    text = _table(["training", f"student ({STUDENT})", f"large ({label(LARGE)})"], rows)
    text += "\n\n" + _table(
        ["comparison", "difference", "in seeds", "verdict"],
        [
            ["DML student − distilled student", versus.cell(), versus.score(), versus.verdict],
            [
                "distilled student − student alone",
                versus_alone.cell(),
                versus_alone.score(),
                versus_alone.verdict,
            ],
            [
                "large network in DML − large alone",
                large_gain.cell(),
                large_gain.score(),
                large_gain.verdict,
            ],
        ],
    )
    return Section(
        "4. Distillation from a pre-trained large network vs mutual learning with it untrained",
        "Student: the MLP; large network: a 1-D CNN with 64 channels. The teacher is the large "
        "network trained alone with the same seed, frozen, and the student mimics it with the "
        "same alpha and temperature as DML. Test accuracy (%).\n\n" + text,
        [
            (
                "mutual learning with the untrained large network beats distillation from it "
                "pre-trained",
                "student: " + versus.describe(),
                versus.verdict,
            )
        ],
    )


def entropy_section(r: Results) -> Section:
    s = r.setting
    rows, claims = [], []
    for pair in PAIRS:
        base, dml = cohort(s, pair, "independent"), cohort(s, pair, "dml")
        for network in _networks(dml):
            arms = {
                "train": [r.analysed(run, "train_entropy", network) for run in (base, dml)],
                "test": [r.peers(run, "test_entropy", network) for run in (base, dml)],
            }
            train, test = (paired(*arms[split]) for split in ("train", "test"))
            rows.append(
                [" + ".join(pair), _shown(network, pair)]
                + [mean_std(v, 3) for v in arms["train"]]
                + [train.cell(3), train.score(), train.verdict]
                + [mean_std(v, 3) for v in arms["test"]]
                + [test.cell(3), test.score(), test.verdict]
            )
            claims.append(
                (
                    f"DML peers have higher posterior entropy: {network} in {'+'.join(pair)}",
                    f"training set: {train.describe('nats', 3)}; test set: {test.cell(3)}",
                    train.verdict,
                )
            )
    header = ["pair", "network"]
    for split in ("train", "test"):
        header += [f"{split}: independent", f"{split}: DML", "DML − independent", "higher in"]
        header += ["verdict"]
    return Section(
        "5. Posterior entropy",
        "Mean entropy (nats) of the peers' class posteriors on the training set and on the "
        "test set, for the MNIST-1D runs of section 1. The summary's verdict is the training "
        "set's, as in the paper.\n\n" + _table(header, rows),
        claims,
    )


def perturbation_section(r: Results) -> Section:
    s = r.setting
    rows, claims, curves = [], [], {}
    for pair in PAIRS[:2]:
        arms = {
            name: r.analysed(cohort(s, pair, mode), "perturbed_loss")
            for name, mode in (("independent", "independent"), ("DML", "dml"))
        }
        for name, per_seed in arms.items():
            rows.append(
                [" + ".join(pair), name]
                + [mean_std(column, 3) for column in zip(*per_seed, strict=True)]
            )
        curves[" + ".join(pair)] = arms
        rise = {  # the mean rise over the sigmas > 0, per seed
            name: [statistics.fmean(curve[1:]) - curve[0] for curve in per_seed]
            for name, per_seed in arms.items()
        }
        difference = paired(rise["independent"], rise["DML"], better="lower")
        claims.append(
            (
                f"DML finds wider minima: {'+'.join(pair)} training loss rises less under weight "
                "noise",
                f"mean rise {mean_std(rise['DML'], 3)} (DML), "
                f"{mean_std(rise['independent'], 3)} (independent); DML − independent "
                + difference.describe("", 3),
                difference.verdict,
            )
        )
    text = _table(["pair", "training"] + [f"σ = {sigma:g}" for sigma in s.sigmas], rows)
    return Section(
        "6. Robustness to Gaussian weight noise",
        "The training-set cross-entropy after adding Gaussian noise of standard deviation σ "
        f"to every weight of a peer (mean over {s.draws} noise draws, then over the two peers; "
        "mean ± std over seeds). Peer k of either arm is shaken by the same noise draws, so the "
        "arms differ only in their weights. The verdict tests the rise of the loss, averaged "
        "over the σ > 0, above its value at σ = 0.\n\n" + text,
        claims,
        {"perturbation.png": lambda path: figures.perturbation(s.sigmas, curves, path)},
    )


def schedule_runs(s: Setting) -> list[Run]:
    return [
        cohort(s, pair, "dml", **({"update": "alternating"} if alt else {}))
        for pair in PAIRS[:2]
        for alt in (False, True)
    ]


def schedules_section(r: Results) -> Section:
    s = r.setting
    rows, claims = [], []
    for pair in PAIRS[:2]:
        simultaneous = cohort(s, pair, "dml")
        alternating = cohort(s, pair, "dml", update="alternating")
        for network, name in (("peers", "mean peer"), ("ensemble", "ensemble")):
            cells, difference = _comparison_row(r, simultaneous, alternating, network)
            rows.append([" + ".join(pair), name, *cells])
            if network == "peers":
                claims.append(
                    (
                        f"alternating updates (Algorithm 1) vs simultaneous: {'+'.join(pair)}",
                        difference.describe(),
                        "differ" if difference.verdict != "not resolved" else "no difference",
                    )
                )
    text = _table(
        [
            "pair",
            "",
            "simultaneous",
            "alternating",
            "alternating − simultaneous",
            "alternating higher",
            "verdict",
        ],
        rows,
    )
    return Section(
        "7. Update schedules",
        "Simultaneous: one forward of both peers per batch and one grouped step. Alternating: "
        "the paper's Algorithm 1, where the second peer is stepped against the first peer's "
        "predictions recomputed after its update (three forwards per batch).\n\n" + text,
        claims,
    )


def sensitivity_runs(s: Setting) -> list[Run]:
    pair = ("mlp", "mlp")
    runs = [cohort(s, pair, mode) for mode in ("independent", "dml")]
    runs += [cohort(s, pair, "dml", alpha=a) for a in s.alphas if a != 1.0]
    runs += [cohort(s, pair, "dml", temperature=t) for t in s.temperatures if t != 1.0]
    runs += [
        cohort(s, pair, mode, epochs=e) for e in s.epoch_grid for mode in ("independent", "dml")
    ]
    runs += [cohort(s, pair, mode, optimizer="adamw", lr=1e-3) for mode in ("independent", "dml")]
    return runs


def sensitivity_section(r: Results) -> Section:
    s = r.setting
    pair = ("mlp", "mlp")
    base = cohort(s, pair, "independent")
    rows = []
    for a in s.alphas:
        run = cohort(s, pair, "dml", **({"alpha": a} if a != 1.0 else {}))
        rows.append([f"alpha = {a:g}", *_comparison_row(r, base, run, "peers")[0]])
    for t in s.temperatures:
        run = cohort(s, pair, "dml", **({"temperature": t} if t != 1.0 else {}))
        rows.append([f"temperature = {t:g}", *_comparison_row(r, base, run, "peers")[0]])
    for e in s.epoch_grid:
        runs = [cohort(s, pair, mode, epochs=e) for mode in ("independent", "dml")]
        rows.append([f"{e} epochs", *_comparison_row(r, *runs, "peers")[0]])
    runs = [cohort(s, pair, mode, optimizer="adamw", lr=1e-3) for mode in ("independent", "dml")]
    rows.append(["AdamW, lr 1e-3", *_comparison_row(r, *runs, "peers")[0]])
    text = _table(
        ["setting", "independent", "DML", "DML − independent", "DML better", "verdict"], rows
    )
    return Section(
        "Sensitivity to the defaults",
        "MLP pairs on MNIST-1D, mean peer test accuracy (%). Each row changes one default of "
        f"the runs above (alpha 1, temperature 1, {s.epochs} epochs, SGD with Nesterov momentum "
        "0.9, lr 0.05, cosine schedule, weight decay 5e-4, batch 64); the mimicry weight is "
        "alpha·T², so the temperature rows also weigh the KL more. alpha and temperature rows "
        "compare with the same independent pairs (they have no mimicry).\n\n" + text,
        [],
    )


@dataclass(frozen=True)
class Experiment:
    runs: Callable[[Setting], list[Run]]
    section: Callable[[Results], Section]
    analyse: bool = False  # needs the entropy and perturbation measurements of the pair runs


EXPERIMENTS = {
    "pairs": Experiment(pair_runs, pairs_section),
    "cohort_size": Experiment(size_runs, size_section),
    "modes": Experiment(mode_runs, modes_section),
    "distillation": Experiment(distill_runs, distill_section),
    "entropy": Experiment(pair_runs, entropy_section, analyse=True),
    "perturbation": Experiment(pair_runs, perturbation_section, analyse=True),
    "schedules": Experiment(schedule_runs, schedules_section),
    "sensitivity": Experiment(sensitivity_runs, sensitivity_section),
}


# ---------------------------------------------------------------------------------------------
# The report


def _machine() -> str:
    facts = describe()
    return f"{facts['cpus']}-core {facts['cpu_model']}, torch {facts['torch']}"


def render(
    sections: dict[str, Section],
    records: dict[tuple[str, int], dict[str, Any]],
    setting: Setting,
    command: str,
    wall: float,
    workers: int,
    notes: str | None = None,
) -> str:
    summary = [list(claim) for section in sections.values() for claim in section.claims]
    seconds = sum(record["train_seconds_total"] for record in records.values())
    trained = sum(record["trained_now"] for record in records.values())
    lines = [
        "# Deep Mutual Learning, reproduced on MNIST-1D",
        "",
        "<!-- Generated by `python -m experiments.reproduce`; edit that script, not this file. -->",
        "",
        "Zhang et al. (CVPR 2018) report that peers trained with DML beat the same networks "
        "trained alone, more so in larger cohorts, that the pairwise form beats an ensemble "
        "teacher, that mutual learning with an untrained large network beats distillation from "
        "it pre-trained, and that DML peers have more uncertain posteriors and wider minima. "
        "This page measures each claim with fastdml on MNIST-1D (4000 training and 1000 test "
        "sequences of length 40, 10 classes, generated offline) and on scikit-learn's digits.",
        "",
        "## How the numbers were made",
        "",
        f"- Command: `{command}`",
        f"- Seeds {', '.join(map(str, setting.seeds))}; every number is a mean ± sample std over "
        "them. Defaults: SGD with Nesterov momentum 0.9, lr 0.05, cosine schedule, weight decay "
        f"5e-4, batch 64, {setting.epochs} epochs, alpha 1, temperature 1, simultaneous updates; "
        "MLP: two hidden layers of 256; CNN: the three-convolution 1-D CNN of the MNIST-1D paper "
        "(25 channels).",
        "- A comparison is the paired difference over seeds (both arms of one seed start from the "
        "same initial weights and see the same batches): mean ± std of the difference, in how "
        "many seeds it has the sign the claim predicts, and a verdict: **holds** or **reversed** "
        "when a two-sided paired t-test over the seeds rejects no difference at the 5% level, "
        "**not resolved** otherwise.",
        f"- Machine: {_machine()}; {workers} worker processes of one thread. The {len(records)} "
        f"runs' training loops took {seconds / 60:.1f} min in all; this call trained "
        f"{trained} of them and took {wall / 60:.1f} min of wall time.",
        "",
        "## Summary",
        "",
        _table(["claim", "measured", "verdict"], summary),
    ]
    if notes is not None:
        lines += ["", "## What the measurements say", "", notes.strip()]
    for name, section in sections.items():
        lines += [
            "",
            f"## {section.title}",
            "",
            f"Reproduce: `python -m experiments.reproduce --only {name}`",
            "",
            section.text,
        ]
        lines += [f"\n![{image}](results/{image})" for image in section.figures]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", help=f"comma-separated: {', '.join(EXPERIMENTS)} (all)")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny setting that checks the pipeline"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="where results.md goes (docs)"
    )
    parser.add_argument(
        "--work", type=Path, help="the runs' folders (runs/reproduce, or OUT/runs with --quick)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    setting = QUICK if args.quick else FULL
    work = args.work or (args.out / "runs" if args.quick else ROOT / "runs" / "reproduce")
    chosen = [EXPERIMENTS[n] for n in names]
    analyse = []
    if any(e.analyse for e in chosen):
        analyse = [run for run in pair_runs(setting) if run.options["dataset"] == "mnist1d"]
    dml, *others = mode_runs(setting)
    start = time.perf_counter()
    results = execute(
        [run for e in chosen for run in e.runs(setting)],
        analyse,
        [(dml, run) for run in others] if "modes" in names else [],
        setting=setting,
        work=work,
        workers=args.workers,
    )
    sections = {name: EXPERIMENTS[name].section(results) for name in names}
    images = args.out / "results"
    images.mkdir(parents=True, exist_ok=True)
    for section in sections.values():
        for image, draw in section.figures.items():
            draw(images / image)
    command = " ".join(["python -m experiments.reproduce", *argv])
    notes = None  # a reading of the full study's numbers: it belongs to them alone
    if setting == FULL and set(names) == set(EXPERIMENTS) and NOTES.is_file():
        notes = NOTES.read_text()
    wall = time.perf_counter() - start
    (args.out / "results.md").write_text(
        render(sections, results.records, setting, command, wall, args.workers, notes)
    )
    (images / "results.json").write_text(
        json.dumps(
            {
                "setting": dataclasses.asdict(setting),
                "records": {
                    f"{name}/seed{seed}": rec for (name, seed), rec in results.records.items()
                },
                "analyses": {
                    f"{name}/seed{seed}": a for (name, seed), a in results.analyses.items()
                },
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{args.out / 'results.md'}: {len(sections)} experiments, {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
