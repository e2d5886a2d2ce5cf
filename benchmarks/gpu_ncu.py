"""What the CUDA op's forward moves and executes, from Nsight Compute's counters.

    ncu --clock-control none --csv --kernel-name regex:mutual_loss_kernel --launch-skip 1 \\
        --launch-count 1 --metrics "$(python -m benchmarks.gpu_ncu metrics)" \\
        python -m benchmarks.gpu_ncu run float32 > OUTDIR/ncu_float32.csv
    python -m benchmarks.gpu_ncu summarize OUTDIR/ncu_*.csv > OUTDIR/ncu.jsonl

`run` makes the logits of SHAPE in a dtype and calls the loss twice (backend "cuda"): the first
launch warms up (`--launch-skip 1`), the second is the one profiled. `summarize` reads ncu's CSV
and writes a JSON line per profiled kernel: its DRAM bytes read and written, as multiples of the
logits' bytes (one read of the logits and one write of the gradient is 1.0 and 1.0), the
instructions it executed per logit, its warps' occupancy and its duration.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

SHAPE = (4, 8192, 32000)  # (K, N, C): rows past one block's shared memory
METRICS = {
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
    "smsp__inst_executed.sum": "instructions",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "warps_active_pct",
    "gpu__time_duration.sum": "duration",
}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# ncu's units, to bytes and seconds.
SCALE = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1e-9, "usecond": 1e-6}
SCALE |= {"msecond": 1e-3, "second": 1, "inst": 1, "%": 1}


def run(dtype: str) -> None:
    """Two forwards of the loss at SHAPE on the CUDA op (the second is profiled)."""
    import torch

    import fastdml

    k, n, c = SHAPE
    logits = torch.randn(k, n, c, device="cuda").to(getattr(torch, dtype)).requires_grad_()
    target = torch.randint(0, c, (n,), device="cuda")
    for _ in range(2):
        fastdml.mutual_loss(logits, target, backend="cuda")
    torch.cuda.synchronize()


def parse(text: str, dtype: str) -> list[dict]:
    """ncu's --csv output (one row per kernel and metric) as one record per kernel."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu table in the output (did ncu profile a kernel?)")
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        name = METRICS.get(row["Metric Name"])
        if name is None:
            continue
        record = kernels.setdefault(row["ID"], {"kernel": row["Kernel Name"], "dtype": dtype})
        unit = row["Metric Unit"]
        if unit not in SCALE:
            raise ValueError(f"{row['Metric Name']}: unit {unit!r} is not one of {sorted(SCALE)}")
        record[name] = float(row["Metric Value"].replace(",", "")) * SCALE[unit]
    logits = SHAPE[0] * SHAPE[1] * SHAPE[2]
    logit_bytes = logits * ITEMSIZE[dtype]
    for record in kernels.values():
        record["shape"] = list(SHAPE)
        record["logit_bytes"] = logit_bytes
        record["dram_read_per_logits"] = record["dram_read_bytes"] / logit_bytes
        record["dram_write_per_logits"] = record["dram_write_bytes"] / logit_bytes
        # Warp instructions, 32 threads each: a thread's instructions per logit, as the static
        # counts of benchmarks/sass_report.py (both passes and everything around them here).
        record["instructions_per_logit"] = record["instructions"] * 32 / logits
    return list(kernels.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("metrics", help="the --metrics list for ncu")
    runner = commands.add_parser("run", help="the forwards to profile")
    runner.add_argument("dtype", choices=sorted(ITEMSIZE))
    summary = commands.add_parser("summarize", help="ncu's CSV files to JSON lines")
    summary.add_argument("files", nargs="+", type=Path, help="ncu_<dtype>.csv")
    args = parser.parse_args(argv)
    if args.command == "metrics":
        print(",".join(METRICS))
    elif args.command == "run":
        run(args.dtype)
    else:
        for path in args.files:
            for record in parse(path.read_text(), path.stem.removeprefix("ncu_")):
                sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
