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
from fastdml.cohort import Cohort
from fastdml.data import InMemoryLoader, load_dataset
from fastdml.models import build_model
from fastdml.trainer import Trainer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="1,2,4")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trainer.json"))
    args = parser.parse_args()
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
