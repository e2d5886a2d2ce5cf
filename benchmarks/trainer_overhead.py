"""The cohort trainer's cost over a hand-written loop doing the same work, and its throughput.

The workload is `fastdml train`'s default: K MLP peers on MNIST-1D (4000 training sequences of
length 40, 10 classes), batches of 64, SGD with Nesterov momentum, the DML loss (K = 1: the
cross-entropy alone). The hand-written loop runs the same peers, batches, loss and one foreach
SGD over per-peer param groups; the trainer adds its data order, per-peer metrics, schedule and
bookkeeping (no evaluation, no checkpoints). The variants alternate in short runs, many times,
and each one's fastest run is compared: the machine may be shared, and interference only ever
adds time (the medians are stored too).

    python -m benchmarks.trainer_overhead --out benchmarks/results/trainer.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
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


def hand_written(x, y, k: int, epochs: int, batch_size: int) -> float:
    """Seconds for `epochs` epochs of the plain loop a user would write."""
    peers = make_peers(k)
    optimizer = torch.optim.SGD([{"params": p.parameters()} for p in peers], foreach=True, **SGD)
    loader = InMemoryLoader(x, y, batch_size=batch_size)
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            logits = [peer(xb) for peer in peers]
            loss = F.cross_entropy(logits[0], yb) if k == 1 else mutual_loss(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
    times: dict[str, list[float]] = {"hand": [], "trainer": [], "trainer_progress": []}
    trainer(x, y, k, 1, batch_size, False)  # warm-up
    for _ in range(repeats):
        times["hand"].append(hand_written(x, y, k, epochs, batch_size))
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
        "overhead": best["trainer"] / best["hand"] - 1,
        "overhead_progress": best["trainer_progress"] / best["hand"] - 1,
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
    for k in (int(v) for v in args.peers.split(",")):
        row = measure(k, args.epochs, args.repeats, args.batch_size)
        rows.append(row)
        print(
            f"K={k}: hand {row['hand_step_us']:.0f} us/step, trainer {row['trainer_step_us']:.0f} "
            f"us/step ({100 * row['overhead']:+.1f}%), with progress bars "
            f"{100 * row['overhead_progress']:+.1f}%, {row['samples_per_s']:.0f} samples/s"
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
