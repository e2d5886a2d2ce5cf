"""Distributed cohorts on one machine, gloo on the CPU: the step time and the bytes a rank
receives per step with 1, 2 and 4 processes, and test accuracy against codistillation's exchange
period.

Steps: K = 4 MLP peers (40-256-256-10) on MNIST-1D, batches of 64, SGD, the DML loss; one torch
thread per process; each layout launched by torchrun, its steps timed one by one on every rank
after a warm-up (rank 0's median is reported; the steps of all ranks wait for each other's
logits). One process is the plain `Cohort`, the baseline.

Accuracy: two MLP peers on MNIST-1D on two processes (one peer each), `fastdml train`'s defaults
(60 epochs), for each exchange period and seed; plus the independent baseline (alpha = 0).

    python -m benchmarks.distributed_step            # measures, then renders the markdown
    python -m benchmarks.distributed_step --render   # renders benchmarks/distributed.md only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"
MARKDOWN = ROOT / "benchmarks" / "distributed.md"
# (processes, replicas, exchange period) of the step-time table
LAYOUTS = [(1, 1, 1), (2, 1, 1), (2, 1, 10), (4, 1, 1), (4, 1, 10), (4, 2, 1)]
PERIODS = [1, 10, 100]
SEEDS = [0, 1, 2]
WARMUP, STEPS = 30, 600


def torchrun(processes: int, *args: str) -> None:
    """Runs `python args` as the ranks of a torchrun job on this machine, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", *args]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def time_steps(replicas: int, exchange_every: int, out: Path) -> None:
    """A rank of a step-time run; rank 0 appends its result to `out` (JSON lines)."""
    from fastdml import Cohort, build_model, load_dataset
    from fastdml.data import InMemoryLoader
    from fastdml.distributed import DistributedCohort, init_from_environment, shutdown

    torch.set_num_threads(1)
    init_from_environment(torch.device("cpu"))
    data = load_dataset("mnist1d")
    torch.manual_seed(0)
    peers = [build_model("mlp", data.input_shape, data.num_classes) for _ in range(4)]
    world = dist.get_world_size()
    if world == 1:
        cohort = Cohort(peers, device="cpu")
    else:
        cohort = DistributedCohort(
            peers, replicas=replicas, exchange_every=exchange_every, device="cpu"
        )
    loader = InMemoryLoader(*data.train.tensors, batch_size=64, drop_last=True)
    batches = [batch for _, batch in zip(range(len(loader)), loader, strict=False)]
    seconds = []
    for step in range(WARMUP + STEPS):
        x, y = batches[step % len(batches)]
        if step == WARMUP and world > 1:
            cohort.traffic = type(cohort.traffic)()  # count the timed steps only
        start = time.perf_counter()
        cohort.train_step(x, y)
        seconds.append(time.perf_counter() - start)
    timed = sorted(seconds[WARMUP:])
    if dist.get_rank() == 0:
        local = cohort.placement.local_peers if world > 1 else range(4)
        gradient_bytes = sum(p.nbytes for k in local for p in cohort.peers[k].parameters())
        received = cohort.traffic.per_step() if world > 1 else {"logits": 0.0, "weights": 0.0}
        result = {
            "processes": world,
            "replicas": replicas,
            "exchange_every": exchange_every,
            "peers_per_rank": len(local),
            "median_ms": 1e3 * statistics.median(timed),
            "p90_ms": 1e3 * timed[int(0.9 * len(timed))],
            "received_logits_bytes": received["logits"],
            "received_weights_bytes": received["weights"],
            # a ring all-reduce sends and receives 2 (R - 1) / R of the gradients
            "ddp_gradient_bytes": 2 * (replicas - 1) / replicas * gradient_bytes,
        }
        with open(out, "a") as file:
            file.write(json.dumps(result) + "\n")
    shutdown()


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def final_record(scratch: Path, name: str, seed: int, *options: str) -> dict[str, float]:
    """The last epoch's record of a two-process `fastdml train` of two MLP peers."""
    out = scratch / f"{name}-seed{seed}"
    torchrun(
        2, "-m", "fastdml", "train", "--peers", "mlp,mlp", "--seed", str(seed),
        "--no-progress", "--out", str(out), *options,
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    received = {  # the epochs have the same number of steps: the mean of their means
        key: statistics.mean(r[key] for r in records)
        for key in ("received_bytes_per_step/logits", "received_bytes_per_step/weights")
    }
    return {**records[-1], **received, "train_seconds": sum(r["train_seconds"] for r in records)}


def measure() -> dict:
    results: dict = {"machine": machine.describe(), "threads_per_process": 1}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        steps = scratch / "steps.jsonl"
        results["load_before_steps"] = load()
        for processes, replicas, every in LAYOUTS:
            torchrun(
                processes, "-m", "benchmarks.distributed_step",
                "--time-steps", str(replicas), str(every), str(steps),
            )  # fmt: skip
        results["steps"] = [json.loads(line) for line in steps.read_text().splitlines()]
        results["load_before_accuracy"] = load()
        runs = [("independent", ["--mode", "independent"])]
        runs += [(f"every {n}", ["--exchange-every", str(n)]) for n in PERIODS]
        results["accuracy"] = {
            name: [final_record(scratch, name.replace(" ", ""), s, *options) for s in SEEDS]
            for name, options in runs
        }
        results["load_after"] = load()
    return results


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "Measured with `python -m benchmarks.distributed_step` (results in "
        "`benchmarks/results/distributed.json`) on a "
        f"{m['cpus']}-core {m['cpu_model']} VM ({m['cpu_family_model']}), torch {m['torch']}, "
        f"{results['threads_per_process']} torch thread per process, gloo over the loopback "
        "interface, every process launched by torchrun on this one machine. Load averages "
        f"(1, 5, 15 min) before the step timings: {results['load_before_steps']}; before the "
        f"accuracy runs: {results['load_before_accuracy']}; at the end: {results['load_after']}.",
        "",
        "### Step time and bytes received per step",
        "",
        "K = 4 MLP peers (40-256-256-10) on MNIST-1D, batches of 64 (every rank reads the whole "
        "batch; replicas train on halves of it), SGD, the DML loss. Each layout ran "
        f"{WARMUP} warm-up steps, then {STEPS} timed steps one by one; the table gives rank "
        "0's median and 90th percentile. Bytes are those a rank received per step: the other "
        "groups' logits (counted by `DistributedCohort.traffic`), codistillation's weight "
        "broadcasts, and, computed rather than counted, what DDP's ring all-reduce moves for "
        "the rank's gradients (2 (R - 1) / R of them).",
        "",
        "| processes | groups × replicas | peers per rank | exchange every | median ms/step "
        "| p90 ms/step | logits B/step | weights B/step | DDP gradients B/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["steps"]:
        groups = r["processes"] // r["replicas"]
        lines.append(
            f"| {r['processes']} | {groups} × {r['replicas']} | {r['peers_per_rank']} "
            f"| {r['exchange_every']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['received_logits_bytes']:,.0f} | {r['received_weights_bytes']:,.0f} "
            f"| {r['ddp_gradient_bytes']:,.0f} |"
        )
    lines += [
        "",
        f"This machine has {m['cpus']} cores: with 4 processes it is oversubscribed (4 busy "
        "processes share 2 cores), so those step times measure contention, not what 4 "
        "devices would do. The exchange is tiny here (a batch's logits are 64 × 10 floats a "
        "peer); what 2 processes gain over 1 is the peers' compute split over 2 cores.",
        "",
        "### Accuracy against the exchange period (codistillation)",
        "",
        "Two MLP peers on MNIST-1D, one per process, `fastdml train`'s defaults (60 epochs, "
        "batches of 64, cosine schedule); test accuracy (%) after the last epoch, mean ± std "
        f"over seeds {', '.join(map(str, SEEDS))}. Every 1 is DML with the logits exchanged "
        "every step; every n > 1 exchanges logits and broadcasts the weights every n steps and "
        "uses the stale copies in between. Bytes: received per step by a rank, over the run.",
        "",
        "| run | peer0 | peer1 | ensemble | logits B/step | weights B/step | train s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results["accuracy"].items():
        column = {key: [r[key] for r in runs] for key in runs[0]}
        lines.append(
            f"| {name} | {_mean_std(column['test_acc/peer0'])} "
            f"| {_mean_std(column['test_acc/peer1'])} "
            f"| {_mean_std(column['test_acc/ensemble'])} "
            f"| {statistics.mean(column['received_bytes_per_step/logits']):,.0f} "
            f"| {statistics.mean(column['received_bytes_per_step/weights']):,.0f} "
            f"| {statistics.mean(column['train_seconds']):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--render", action="store_true", help="only render the markdown")
    parser.add_argument("--time-steps", nargs=3, metavar=("REPLICAS", "EVERY", "OUT"))
    args = parser.parse_args()
    if args.time_steps:
        replicas, every, out = args.time_steps
        time_steps(int(replicas), int(every), Path(out))
        return
    if not args.render:
        RESULTS.write_text(json.dumps(measure(), indent=1) + "\n")
    MARKDOWN.write_text(render(json.loads(RESULTS.read_text())))
    print(f"wrote {RESULTS.relative_to(ROOT)} and {MARKDOWN.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
