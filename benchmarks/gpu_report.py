"""Markdown tables of a GPU benchmark run (benchmarks/test_gpu.py's JSON), for BENCHMARKS.md.

    python -m benchmarks.gpu_report OUT/gpu_core.jsonl > OUT/gpu.md   (or a pytest-benchmark JSON)

Per shape and dtype: each candidate's median forward and forward + backward time (CUDA events),
the fraction of the bandwidth floor its forward + backward reaches, its speed-up over each baseline,
its peak memory above the inputs, and (at the launch-count shape) its CUDA kernel launches.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("eager_pairs", "vectorized", "torch_compile", "liger")
BYTES = {"float32": 4, "bfloat16": 2}
MIB = 1 << 20


def render(run: dict) -> str:
    bandwidth = None
    cases: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if bench["group"] == "copy bandwidth":
            bandwidth, device = info["bytes_per_s"], info["device"]
            continue
        case = (info["K"], info["N"], info["C"], info["dtype"])
        cases[case][info["candidate"]][info["pass"]] = info
    if bandwidth is None:
        raise SystemExit("the run has no copy-bandwidth measurement")
    present = {name for by_name in cases.values() for name in by_name}
    baselines = [name for name in BASELINES if name in present]
    lines = [
        f"GPU: {device}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write, measured in "
        f"the same run); times are medians of CUDA-event timings.",
        "",
    ]
    for (k, n, c, dtype), by_name in cases.items():
        floor_bytes = k * n * c * 2 * BYTES[dtype]
        floor_ms = floor_bytes / bandwidth * 1e3
        lines += [
            f"### K={k}, N={n}, C={c}, {dtype} (floor {floor_ms:.3f} ms)",
            "",
            "| candidate | forward ms | fwd+bwd ms | % of floor | "
            + " | ".join(f"vs {b}" for b in baselines)
            + " | peak extra MiB (logits+grad = "
            + f"{floor_bytes / MIB:.0f}) | launches |",
            "|---" * (6 + len(baselines)) + "|",
        ]
        for name, passes in by_name.items():
            both = passes.get("forward_backward", {})
            ms = both.get("median_ms")
            ratios = []
            for baseline in baselines:
                other = by_name.get(baseline, {}).get("forward_backward", {}).get("median_ms")
                ratios.append(f"{other / ms:.2f}x" if ms and other else "")
            cells = [
                name,
                _ms(passes.get("forward", {}).get("median_ms")),
                _ms(ms),
                f"{100 * floor_ms / ms:.0f}%" if ms else "",
                *ratios,
                f"{both['peak_extra_bytes'] / MIB:.0f}" if "peak_extra_bytes" in both else "",
                str(both.get("kernel_launches", "")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def render_smoke(records: list[dict]) -> str:
    """The correctness smoke: per backend and dtype, the largest relative errors against float64
    over modes and shapes, and every other check with its outcome."""
    worst: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    lines = ["| check | outcome |", "|---|---|"]
    for record in records:
        backend, check = record["check"].split(" ", 1)
        if check.startswith("accuracy") and "loss_error" in record:
            cell = worst[(backend, check.rsplit(" ", 1)[1])]
            for key in ("loss_error", "grad_error"):
                cell[key] = max(cell.get(key, 0.0), record[key])
            cell["runs"] = cell.get("runs", 0) + 1
            cell["failed"] = cell.get("failed", 0) + (not record["ok"])
        elif not check.startswith("accuracy") or not record.get("ok", True):
            shown = {k: v for k, v in record.items() if k not in ("check", "seconds", "traceback")}
            error = shown.pop("error", None)
            outcome = "ok" if shown.pop("ok", True) else "FAILED"
            details = ", ".join(f"{k} {_short(v)}" for k, v in shown.items() if k != "kernels")
            if isinstance(error, str):
                details = error.splitlines()[0]
            elif error is not None:
                details = f"error {error:.1e}"
            lines.append(f"| {backend} {check} | {outcome}{': ' + details if details else ''} |")
    table = [
        "| backend | dtype | cases | failed | largest loss error | largest gradient error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (backend, dtype), cell in sorted(worst.items()):
        table.append(
            f"| {backend} | {dtype} | {cell['runs']} | {cell['failed']} | "
            f"{cell['loss_error']:.1e} | {cell['grad_error']:.1e} |"
        )
    return "\n".join(table) + "\n\n" + "\n".join(lines)


def render_tuning(records: list[dict]) -> str:
    """Triton's tile choices: forward + backward median per shape, in ms."""
    shapes = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in records))
    by_tile: dict[tuple, dict] = defaultdict(dict)
    for r in records:
        by_tile[tuple(r["tile"])][(tuple(r["shape"]), r["dtype"])] = r["median_ms"]
    header = "| tile bytes, elements a thread | " + " | ".join(f"{s} {d}" for s, d in shapes) + " |"
    lines = [header, "|---" + "|---:" * len(shapes) + "|"]
    for tile, times in by_tile.items():
        cells = [f"{times[shape]:.3f}" if shape in times else "" for shape in shapes]
        lines.append(f"| {tile[0]}, {tile[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def load_lines(path: str) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def load(path: str) -> dict:
    """A pytest-benchmark JSON file, or the JSON lines of FASTDML_GPU_LOG (one case a line)."""
    with open(path) as file:
        if path.endswith(".jsonl"):
            return {"benchmarks": [json.loads(line) for line in file if line.strip()]}
        return json.load(file)


if __name__ == "__main__":
    print(render(load(sys.argv[1])))
