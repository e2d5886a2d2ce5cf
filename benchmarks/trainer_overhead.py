"""The cohort trainer's cost over a hand-written loop doing the same work, and its throughput.

The workload is `fastdml train`'s default: K MLP peers on MNIST-1D (4000 training sequences of
length 40, 10 classes), batches of 64, SGD with Nesterov momentum, the DML loss (K = 1: the
cross-entropy alone). Two hand-written loops run the same peers, batches, loss and one foreach
SGD over per-peer param groups: "bare" does only forward, loss, backward and step; "logging"
also keeps, as the trainer does, each peer's running cross-entropy, mimicry and correct count on
the device. The trainer adds its data order, per-epoch records and bookkeeping (no evaluation,
no checkpoints). The variants alternate in short runs, many times, and each one's fastest run is
compared: the machine may be shared, and interference only ever adds time (the medians are
stored too).

    python -m benchmarks.trainer_overhead --out benchmarks/results/trainer.json

With ``--stacked CASES`` it times instead the same peers as `Cohort` and as `StackedCohort`
(batches of ``--batch-size``, alternating runs, paired ratios): mlp (K = 4, hidden 256), mlp-h64
(K = 8, hidden 64), cnn1d (K = 4) on MNIST-1D, and resnet32 (K = 8, random data of CIFAR-100's
shape, for ``--device cuda``):

    python -m benchmarks.trainer_overhead --stacked mlp,mlp-h64,cnn1d --batch-size 128 \
        --out benchmarks/results/trainer_stacked.json
    python -m benchmarks.trainer_overhead --stacked resnet32 --device cuda --batch-size 128 \
        --repeats 10 --out benchmarks/results/trainer_stacked_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import machine
from fastdml import mutual_loss
from fastdml.cohort.cohort import Cohort
from fastdml.cohort.trainer import Trainer
from fastdml.data import InMemoryLoader, load_dataset
from fastdml.models import build_model
from fastdml.stacked.cohort import StackedCohort

SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def make_peers(k: int) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [build_model("mlp", (40,), 10) for _ in range(k)]


def hand_written(x, y, k: int, epochs: int, batch_size: int, logging: bool) -> float:
    """Seconds for `epochs` epochs of the loop a user would write."""
    peers = make_peers(k)
    optimizer = torch.optim.SGD([{"params": p.parameters()} for p in peers], foreach=True, **SGD)
    loader = InMemoryLoader(x, y, batch_size=batch_size)
    sums = torch.zeros(3, k)  # cross-entropy, mimicry, correct
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            logits = [peer(xb) for peer in peers]
            if k == 1:
                loss = F.cross_entropy(logits[0], yb)
                terms = (loss.detach().reshape(1), torch.zeros(1))
            elif logging:
                loss, *terms = mutual_loss(logits, yb, return_components=True)
            else:
                loss = mutual_loss(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if logging:
                sums[:2] += torch.stack(terms) * len(yb)
                sums[2] += torch.stack([(z.detach().argmax(1) == yb).sum() for z in logits])
    return time.perf_counter() - start


def trainer(x, y, k: int, epochs: int, batch_size: int, progress: bool) -> float:
    """Seconds for the same epochs through `Cohort` and `Trainer`."""
    cohort = Cohort(make_peers(k), options=SGD, device="cpu")
    run = Trainer(cohort, (x, y), epochs=epochs, batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars drawn, not shown
        run.run()
    return time.perf_counter() - start


def measure(k: int, epochs: int, repeats: int, batch_size: int) -> dict[str, float]:
    x, y = load_dataset("mnist1d").train.tensors
    steps = epochs * -(-len(y) // batch_size)
    times: dict[str, list[float]] = {
        "bare": [],
        "logging": [],
        "trainer": [],
        "trainer_progress": [],
    }
    trainer(x, y, k, 1, batch_size, False)  # warm-up
    for _ in range(repeats):
        times["bare"].append(hand_written(x, y, k, epochs, batch_size, False))
        times["logging"].append(hand_written(x, y, k, epochs, batch_size, True))
        times["trainer"].append(trainer(x, y, k, epochs, batch_size, False))
        times["trainer_progress"].append(trainer(x, y, k, epochs, batch_size, True))
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "peers": k,
        "steps": steps,
        "samples": epochs * len(y),
        **{f"{name}_step_us": 1e6 * value / steps for name, value in best.items()},
        **{f"{name}_median_step_us": 1e6 * value / steps for name, value in median.items()},
        "overhead": best["trainer"] / best["logging"] - 1,
        "overhead_progress": best["trainer_progress"] / best["logging"] - 1,
        "overhead_over_bare": best["trainer"] / best["bare"] - 1,
        "samples_per_s": epochs * len(y) / best["trainer"],
        "all_s": times,
    }


STACKED_CASES = {  # name: architecture, its options, input shape, peers
    "mlp": ("mlp", {}, (40,), 4),
    "mlp-h64": ("mlp", {"hidden": 64}, (40,), 8),
    "cnn1d": ("cnn1d", {}, (40,), 4),
    "resnet32": ("resnet32", {}, (3, 32, 32), 8),
}


def stacked_vs_unstacked(
    case: str, batch_size: int, repeats: int, steps: int, device: str
) -> dict[str, object]:
    """Training throughput of the same peers as `Cohort` and as `StackedCohort`, alternating
    runs of `steps` steps. MNIST-1D on the CPU; random data of CIFAR-100's shape for resnet32
    (100 classes)."""
    arch, options, shape, k = STACKED_CASES[case]
    classes = 100 if arch == "resnet32" else 10
    if arch == "resnet32":
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(steps * batch_size, *shape, generator=gen)
        y = torch.randint(0, classes, (len(x),), generator=gen)
    else:
        x, y = load_dataset("mnist1d").train.tensors
    batches = list(InMemoryLoader(x.to(device), y.to(device), batch_size=batch_size))[:steps]
    cohorts = {}
    for kind in (Cohort, StackedCohort):
        torch.manual_seed(0)
        peers = [build_model(arch, shape, classes, **options) for _ in range(k)]
        cohorts[kind.__name__] = kind(peers, options=SGD, device=device).train()

    def run(cohort: Cohort) -> float:
        start = time.perf_counter()
        for xb, yb in batches:
            cohort.train_step(xb, yb)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for cohort in cohorts.values():  # warm-up
        run(cohort)
    times: dict[str, list[float]] = {name: [] for name in cohorts}
    for _ in range(repeats):
        for name, cohort in cohorts.items():
            times[name].append(run(cohort))
    samples = sum(len(yb) for _, yb in batches)
    ratios = [a / b for a, b in zip(times["Cohort"], times["StackedCohort"], strict=True)]
    return {
        "case": case,
        "arch": arch,
        "options": options,
        "peers": k,
        "batch_size": batch_size,
        "steps": len(batches),
        "device": device,
        **{
            f"{name}_samples_per_s": samples / statistics.median(values)
            for name, values in times.items()
        },
        "speedup_median": statistics.median(ratios),
        "speedup_range": [min(ratios), max(ratios)],
        "all_s": times,
    }


def stacked_main(args: argparse.Namespace) -> None:
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for case in args.stacked.split(","):
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            row = pool.submit(
                stacked_vs_unstacked, case, args.batch_size, args.repeats, args.steps, args.device
            ).result()
        rows.append(row)
        print(
            f"{case} K={row['peers']}: unstacked {row['Cohort_samples_per_s']:.0f} samples/s, "
            f"stacked {row['StackedCohort_samples_per_s']:.0f}; paired speedup "
            f"{row['speedup_median']:.2f}x (range {row['speedup_range'][0]:.2f}-"
            f"{row['speedup_range'][1]:.2f})"
        )
    result = {
        "machine": machine.describe(),
        "workload": "K peers as Cohort and as StackedCohort, SGD (Nesterov), DML loss",
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="1,2,4")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trainer.json"))
    parser.add_argument(
        "--stacked",
        metavar="CASES",
        help=f"instead: stacked against unstacked cohorts for some of {','.join(STACKED_CASES)}",
    )
    parser.add_argument("--steps", type=int, default=31, help="steps per timed run (--stacked)")
    parser.add_argument("--device", default="cpu", help="(--stacked) cpu or cuda")
    args = parser.parse_args()
    if args.stacked:
        stacked_main(args)
        return
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for k in (int(v) for v in args.peers.split(",")):
        # a fresh process per cohort size: in one process, the step time of a later size was
        # seen to depend on which sizes ran before it
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            row = pool.submit(measure, k, args.epochs, args.repeats, args.batch_size).result()
        rows.append(row)
        print(
            f"K={k}: us/step: bare loop {row['bare_step_us']:.0f}, logging loop "
            f"{row['logging_step_us']:.0f}, trainer {row['trainer_step_us']:.0f} "
            f"({100 * row['overhead']:+.1f}% over logging, {100 * row['overhead_over_bare']:+.1f}% "
            f"over bare; with progress bars {100 * row['overhead_progress']:+.1f}%), "
            f"{row['samples_per_s']:.0f} samples/s"
        )
    result = {
        "machine": machine.describe(),
        "workload": "mlp peers (40-256-256-10) on MNIST-1D, batch 64, SGD, DML loss",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
