"""Distributed cohorts on one machine, gloo on the CPU: the step time and the bytes a rank
receives per step with 1, 2 and 4 processes, and test accuracy against codistillation's exchange
period.

Steps: K = 4 MLP peers (40-256-256-10) on MNIST-1D, batches of 64, SGD, the DML loss; one torch
thread per process; 2 and 4 processes launched by torchrun, their steps timed one by one on
every rank after a warm-up (rank 0's mean, median and 90th percentile are reported; the ranks
wait for each other's logits). One process is the plain `Cohort`, the baseline.

Accuracy: two MLP peers on MNIST-1D on two processes (one peer each), `fastdml train`'s defaults
(60 epochs), for each exchange period and seed; plus the independent baseline (alpha = 0), and
the DML run of the first seed in one process, which the two processes should reproduce.

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
    """Runs `python args` as the ranks of a torchrun job on this machine, one thread each (one
    process: without torchrun)."""
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    subprocess.run([*command, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def time_steps(replicas: int, exchange_every: int, out: Path) -> None:
    """A rank of a step-time run; rank 0 appends its result to `out` (JSON lines)."""
    from fastdml import Cohort, build_model, load_dataset
    from fastdml.data import InMemoryLoader
    from fastdml.distributed import DistributedCohort, init_from_environment, launched, shutdown

    torch.set_num_threads(1)
    if launched():
        init_from_environment(torch.device("cpu"))
    data = load_dataset("mnist1d")
    torch.manual_seed(0)
    peers = [build_model("mlp", data.input_shape, data.num_classes) for _ in range(4)]
    world = dist.get_world_size() if launched() else 1
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
    if world == 1 or dist.get_rank() == 0:
        local = cohort.placement.local_peers if world > 1 else range(4)
        gradient_bytes = sum(p.nbytes for k in local for p in cohort.peers[k].parameters())
        received = cohort.traffic.per_step() if world > 1 else {"logits": 0.0, "weights": 0.0}
        result = {
            "processes": world,
            "replicas": replicas,
            "exchange_every": exchange_every,
            "peers_per_rank": len(local),
            "mean_ms": 1e3 * statistics.mean(timed),
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


def final_record(out: Path, processes: int, seed: int, *options: str) -> dict[str, float]:
    """The last epoch's record of `fastdml train` of two MLP peers on `processes` processes."""
    torchrun(
        processes, "-m", "fastdml", "train", "--peers", "mlp,mlp", "--seed", str(seed),
        "--no-progress", "--out", str(out), *options,
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    received = {  # the epochs have the same number of steps: the mean of their means
        key: statistics.mean(r.get(key, 0.0) for r in records)
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
            name: [
                final_record(scratch / f"{name.replace(' ', '')}-{seed}", 2, seed, *options)
                for seed in SEEDS
            ]
            for name, options in runs
        }
        results["single_process"] = final_record(scratch / "single", 1, SEEDS[0])
        results["load_after"] = load()
    return results


def _layout(results: dict, processes: int, replicas: int, every: int) -> dict:
    """The step-time result of one layout."""
    key = (processes, replicas, every)
    return next(
        r for r in results["steps"] if (r["processes"], r["replicas"], r["exchange_every"]) == key
    )


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
        f"accuracy runs: {results['load_before_accuracy']}; at the end: {results['load_after']} "
        "(this benchmark's own processes count in them).",
        "",
        "### Step time and bytes received per step",
        "",
        "K = 4 MLP peers (40-256-256-10) on MNIST-1D, batches of 64 (every rank reads the whole "
        "batch; replicas train on halves of it), SGD, the DML loss. Each layout ran "
        f"{WARMUP} warm-up steps, then {STEPS} timed steps one by one; the table gives rank "
        "0's mean (what sets the throughput; with codistillation every 10th step also "
        "broadcasts weights, which the median hides), median and 90th percentile. Bytes are "
        "those a rank received per step: the other groups' logits (counted by "
        "`DistributedCohort.traffic`), codistillation's weight broadcasts, and, computed rather "
        "than counted, what DDP's ring all-reduce moves for the rank's gradients "
        "(2 (R - 1) / R of them).",
        "",
        "| processes | groups × replicas | peers per rank | exchange every | mean ms/step "
        "| median | p90 | logits B/step | weights B/step | DDP gradients B/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["steps"]:
        groups = r["processes"] // r["replicas"]
        lines.append(
            f"| {r['processes']} | {groups} × {r['replicas']} | {r['peers_per_rank']} "
            f"| {r['exchange_every']} | {r['mean_ms']:.2f} | {r['median_ms']:.2f} "
            f"| {r['p90_ms']:.2f} "
            f"| {r['received_logits_bytes']:,.0f} | {r['received_weights_bytes']:,.0f} "
            f"| {r['ddp_gradient_bytes']:,.0f} |"
        )
    lines += [
        "",
        f"This machine has {m['cpus']} cores: with 4 processes it is oversubscribed (4 busy "
        f"processes share {m['cpus']} cores), so those step times measure contention, not what "
        "4 devices would do. Two processes, two peers and one core each, took "
        f"{_layout(results, 2, 1, 1)['mean_ms']:.2f} ms a step on average (median "
        f"{_layout(results, 2, 1, 1)['median_ms']:.2f}) against "
        f"{_layout(results, 1, 1, 1)['mean_ms']:.2f} ms (median "
        f"{_layout(results, 1, 1, 1)['median_ms']:.2f}) for one process with all four peers "
        "on one thread. These peers are small (one MLP's step is about a millisecond) and the "
        "logits tiny (64 × 10 floats a peer), so the exchange's latency and the ranks' waiting "
        "for each other (a stall on either core holds up both, as the 90th percentiles show) "
        "weigh as much as the compute the second process takes over; the placement pays off "
        "for peers whose step is long against the exchange.",
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
    accuracy = results["accuracy"]

    def ensemble(name: str) -> float:
        return statistics.mean(r["test_acc/ensemble"] for r in accuracy[name])

    gains = ", ".join(
        f"{ensemble(name) - ensemble('independent'):+.2f} points with {name}"
        for name in accuracy
        if name != "independent"
    )
    single, same = results["single_process"], accuracy["every 1"][0]
    keys = ("test_acc/peer0", "test_acc/peer1", "test_acc/ensemble")
    lines += [
        "",
        f"Against independent training, the ensemble's mean test accuracy changed by {gains}; "
        f"the spread over seeds is of the same order, so {len(SEEDS)} seeds are indicative, "
        "not conclusive. The same DML run of seed "
        f"{SEEDS[0]} in one process (one thread) ended at "
        f"{', '.join(f'{single[k]:.2f}' for k in keys)} (peer0, peer1, ensemble), on two "
        f"processes at {', '.join(f'{same[k]:.2f}' for k in keys)}. Train s is rank 0's "
        "training time (evaluation left out) summed over the epochs.",
    ]
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
    written = [MARKDOWN]
    if not args.render:
        RESULTS.write_text(json.dumps(measure(), indent=1) + "\n")
        written.insert(0, RESULTS)
    MARKDOWN.write_text(render(json.loads(RESULTS.read_text())))
    print("wrote", " and ".join(str(path.relative_to(ROOT)) for path in written))


if __name__ == "__main__":
    main()
