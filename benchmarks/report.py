"""Renders BENCHMARKS.md and the time-vs-C plot from the benchmark JSON files.

From the repository root, after the timing and memory runs (see benchmarks/__init__.py):

    python -m benchmarks.report

Every number in BENCHMARKS.md comes from the JSON: benchmarks/results/cpu.json (pytest-benchmark:
times, the copy bandwidth, the machine) and benchmarks/results/memory.json (peak_memory.py). The
hand-written explanation of a missed target goes in benchmarks/notes.md, which is copied verbatim.
The GPU section comes from benchmarks/results/gpu_*.jsonl (benchmarks/gpu.sh) and
benchmarks/gpu_notes.md, the Triton compile table from benchmarks/results/triton_compile_*.json,
the cohort trainer's from benchmarks/trainer.md, the distributed cohorts' from
benchmarks/distributed.md (written by benchmarks/distributed_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

from benchmarks import gpu_report, sass_report, triton_compile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CANDIDATES = ("eager_pairs", "torch_compile", "torch", "cpp")
DESCRIPTIONS = {
    "eager_pairs": "the per-pair loop of public DML code: `F.cross_entropy` + "
    '`F.kl_div(log_softmax(z_i), softmax(z_j).detach(), reduction="batchmean")` over the other '
    "peers j, / (K-1), summed over peers (baseline)",
    "torch_compile": "`torch.compile` (static shapes) of the lean vectorized form of the loss "
    "([docs/design.md](docs/design.md#the-pairwise-sum-in-ok)) in plain PyTorch "
    "(`benchmarks/candidates.py: vectorized`: log_softmax, S = Σ_j q_j, "
    "no option handling), compiled and warmed up per shape and dtype before timing (baseline)",
    "torch": '`fastdml.mutual_loss(..., backend="torch")`: fastdml\'s pure-PyTorch backend, '
    "vectorized over the peers, with every option and argument check",
    "cpp": '`fastdml.mutual_loss(..., backend="cpp")`: the fused C++ CPU op',
}
BASELINES = ("eager_pairs", "torch_compile")
PASSES = ("forward", "forward_backward")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# The targets, at this shape in float32, forward + backward, for the fused op.
TARGET = {"K": 4, "N": 1024, "C": 32000, "dtype": "float32", "pass": "forward_backward"}
TARGET_CANDIDATE = "cpp"
TARGET_SPEEDUP = {"torch_compile": 3.0, "eager_pairs": 20.0}
# "peak extra memory no more than one gradient buffer [K, N, C] plus O(K*N)": the O(K*N) part is
# allowed this many bytes per peer and row (16 float32 values).
BYTES_PER_PEER_ROW = 64
# Linux counts resident memory in batches of pages: smaller peaks are shown as "< 1 MiB", and no
# ratio to a gradient buffer smaller than this is shown.
MEMORY_RESOLUTION = 2**20

COMMANDS = """\
python -m pytest benchmarks/test_cpu.py --benchmark-enable \\
    --benchmark-json=benchmarks/results/cpu.json
python -m benchmarks.peak_memory --out benchmarks/results/memory.json
python -m benchmarks.report"""


# Formatting ---------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:.3g}×" if ratio < 1000 else f"{ratio:,.0f}×"


def fmt_bytes(size: float) -> str:
    if abs(size) >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    if abs(size) >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.0f} KiB"


def fmt_peak(peak: int | None) -> str:
    if peak is None:
        return "—"
    return fmt_bytes(peak) if peak >= MEMORY_RESOLUTION else f"< {MEMORY_RESOLUTION >> 20} MiB"


def fmt_peak_ratio(peak: int | None, floor: int) -> str:
    return "—" if peak is None or floor < MEMORY_RESOLUTION else f"{peak / floor:.2f}"


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# Reading ------------------------------------------------------------------------------------


def key(info: dict) -> tuple:
    return (info["K"], info["N"], info["C"], info["dtype"], info["candidate"], info["pass"])


def load(timings_path: Path, memory_path: Path):
    timings = json.loads(timings_path.read_text())
    memory = json.loads(memory_path.read_text()) if memory_path.exists() else None
    loss, sweep, copy = {}, {}, None
    for bench in timings["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        if bench["name"].startswith("test_copy_bandwidth"):
            copy = info["bytes"] / stats["median"]
        elif bench["name"].startswith("test_sweep"):
            sweep[key(info)] = stats["median"]
        else:
            loss[key(info)] = {"median": stats["median"], "rounds": stats["rounds"], **info}
    peaks = {key(r): r["peak_extra_bytes"] for r in memory["results"]} if memory else {}
    return timings, memory, loss, sweep, copy, peaks


def floor_bytes(k: int, n: int, c: int, dtype: str, pass_: str) -> int:
    """Bytes a pass must move: read the logits; forward + backward also writes the gradient."""
    return k * n * c * ITEMSIZE[dtype] * (2 if pass_ == "forward_backward" else 1)


def grad_buffer(k: int, n: int, c: int, dtype: str) -> int:
    return k * n * c * ITEMSIZE[dtype]


# Sections -----------------------------------------------------------------------------------


def machine_section(timings: dict, memory: dict | None) -> str:
    info = timings["machine_info"]
    ours = info.get("fastdml", {})
    cpu = ours.get("cpu_model") or info.get("cpu", {}).get("brand_raw", "unknown CPU")
    commit = timings.get("commit_info", {})
    dirty = " (with uncommitted changes)" if commit.get("dirty") else ""
    lines = [
        f"- CPU: {cpu} ({ours.get('cpu_family_model', '?')}; {ours.get('cpu_simd', '?')}), "
        f"{ours.get('cpus', '?')} CPUs visible, {ours.get('memory_gib', '?')} GiB memory, "
        f"{info.get('system', '')} {info.get('release', '')}",
        f"- Threads used: **{ours.get('threads', '?')}** (`torch.set_num_threads`)",
        f"- torch {ours.get('torch', '?')}, Python {info.get('python_version', '?')}, "
        f"fastdml backends available: {', '.join(ours.get('fastdml_backends', [])) or '?'}",
        f"- Timings run: {timings.get('datetime', '?')}, commit "
        f"{commit.get('id', '?')[:12]}{dirty}",
    ]
    if ours.get("quick") or (memory and memory.get("quick")):
        lines.append(
            "- **Quick run** (`FASTDML_BENCH_QUICK=1`): small shapes only, not the full benchmark"
        )
    if memory:
        lines.append(
            f"- Memory run: {memory.get('datetime', '?')}, threads "
            f"{memory['machine'].get('threads', '?')}"
        )
    else:
        lines.append("- Memory run: none (benchmarks/results/memory.json is missing)")
    return "\n".join(lines)


def method_section(copy: float | None) -> str:
    copy_text = (
        f"**{copy / 1e9:.1f} GB/s**" if copy else "not measured (no `test_copy_bandwidth` result)"
    )
    candidates = "\n".join(f"- `{name}`: {text}" for name, text in DESCRIPTIONS.items())
    return f"""\
Candidates, each computing the DML loss with the default options (pairwise mimicry, T = 1,
α = 1, mean reduction) of logits `[K, N, C]` and targets `[N]`:

{candidates}

Before it is timed, each candidate's loss and gradient on the benchmark input (logits
`2 * randn`, seed 0) are checked against fastdml's torch backend run in float64; the column
*check* is the larger relative error (of the loss, and of the gradient in the 2-norm).

- *forward*: one call under `torch.no_grad()`; *forward_backward*: `loss.backward()` on logits
  that require grad (the gradient is reset, untimed, between rounds). *median* is the median
  over *rounds* calls (pytest-benchmark, `time.perf_counter`), after a warm-up.
- *vs eager_pairs*, *vs torch_compile*: speedup = the baseline's median / the candidate's median,
  same shape, dtype and pass (above 1: faster than the baseline).
- *GB/s*: the bytes a pass must move, K·N·C·(bytes of a logit + bytes of a gradient) for
  forward_backward and K·N·C·(bytes of a logit) for forward, divided by the median time;
  *of copy*: that as a fraction of the machine's copy bandwidth, {copy_text}
  (`dst.copy_(src)`, 1 GiB of float32, read + write counted).
- *peak extra*: the resident memory one call needs on top of its inputs, gradient included: the
  peak RSS during the call minus the RSS before it, after one warm-up call, in a fresh process
  per case (`benchmarks/peak_memory.py`). Linux counts RSS in batches of pages, so it is given
  only from {fmt_bytes(MEMORY_RESOLUTION)} up. */ grad*: that over one gradient buffer
  K·N·C·(bytes of the logits' dtype), the floor of forward_backward (shown for buffers of
  {fmt_bytes(MEMORY_RESOLUTION)} or more). A forward pass returns no gradient (its floor is
  O(K·N)); its ratio is on the same scale for comparison."""


def shape_sections(loss: dict, peaks: dict, copy: float | None) -> str:
    groups = defaultdict(list)
    for k_, entry in loss.items():
        groups[k_[:4]].append(entry)
    sections = []
    dtype_order = list(ITEMSIZE)
    for k, n, c, dtype in sorted(
        groups, key=lambda g: (g[0] * g[1] * g[2], g[0], g[1:3], dtype_order.index(g[3]))
    ):
        rows = []
        for pass_ in PASSES:
            for name in CANDIDATES:
                entry = loss.get((k, n, c, dtype, name, pass_))
                if entry is None:
                    continue
                median = entry["median"]
                speedups = []
                for base in BASELINES:
                    base_entry = loss.get((k, n, c, dtype, base, pass_))
                    speedups.append(base_entry["median"] / median if base_entry else None)
                bandwidth = floor_bytes(k, n, c, dtype, pass_) / median
                peak = peaks.get((k, n, c, dtype, name, pass_))
                rows.append(
                    [
                        f"`{name}`",
                        pass_,
                        fmt_time(median),
                        str(entry["rounds"]),
                        *(fmt_ratio(s) for s in speedups),
                        f"{bandwidth / 1e9:.2f}",
                        f"{bandwidth / copy:.0%}" if copy else "—",
                        fmt_peak(peak),
                        fmt_peak_ratio(peak, grad_buffer(k, n, c, dtype)),
                        f"{max(entry['value_error'], entry['grad_error']):.0e}",
                    ]
                )
        header = [
            "candidate",
            "pass",
            "median",
            "rounds",
            "vs eager_pairs",
            "vs torch_compile",
            "GB/s",
            "of copy",
            "peak extra",
            "/ grad",
            "check",
        ]
        title = (
            f"### (K, N, C) = ({k}, {n}, {c}), {dtype}\n\n"
            f"One gradient buffer: {fmt_bytes(grad_buffer(k, n, c, dtype))}.\n\n"
        )
        sections.append(title + table(header, rows, align="ll" + "r" * 9))
    return "\n\n".join(sections) if sections else "No shape results in the JSON."


def targets_section(loss: dict, peaks: dict, threads) -> str:
    t = TARGET
    where = (
        f"(K, N, C) = ({t['K']}, {t['N']}, {t['C']}), {t['dtype']}, forward + backward, "
        f"`{TARGET_CANDIDATE}`, {threads} threads"
    )
    base = (t["K"], t["N"], t["C"], t["dtype"])
    ours = loss.get((*base, TARGET_CANDIDATE, t["pass"]))
    if ours is None:
        return f"{where}: **not measured** (no such result in the JSON).\n"
    rows = []
    for name, wanted in TARGET_SPEEDUP.items():
        baseline = loss.get((*base, name, t["pass"]))
        if baseline is None:
            rows.append([f"≥ {wanted:g}× faster than `{name}`", "not measured", "—"])
            continue
        speedup = baseline["median"] / ours["median"]
        measured = f"{speedup:.2f}× ({fmt_time(ours['median'])} vs {fmt_time(baseline['median'])})"
        if speedup >= wanted:
            verdict = f"**MET** (by a factor of {speedup / wanted:.2f})"
        else:
            needed = baseline["median"] / wanted
            verdict = (
                f"**MISSED** by a factor of {wanted / speedup:.2f}: it would need "
                f"≤ {fmt_time(needed)}, {(ours['median'] - needed) / ours['median']:.0%} "
                "less time"
            )
        rows.append([f"≥ {wanted:g}× faster than `{name}`", measured, verdict])

    peak = peaks.get((*base, TARGET_CANDIDATE, t["pass"]))
    floor = grad_buffer(t["K"], t["N"], t["C"], t["dtype"])
    allowance = BYTES_PER_PEER_ROW * t["K"] * t["N"]
    name = f"peak extra ≤ one gradient buffer ({fmt_bytes(floor)}) + O(K·N)"
    if peak is None:
        rows.append([name, "not measured", "—"])
    else:
        over = peak - floor
        measured = f"{fmt_bytes(peak)} = {peak / floor:.3f} × floor ({over:+,} B over it)"
        if over <= allowance:
            verdict = f"**MET** ({over / (t['K'] * t['N']):+.1f} B per peer and row)"
        else:
            verdict = (
                f"**MISSED** by {fmt_bytes(over - allowance)} "
                f"({over / (t['K'] * t['N']):.0f} B per peer and row over the buffer)"
            )
        rows.append([name, measured, verdict])
    note = (
        f"O(K·N) is counted as at most {BYTES_PER_PEER_ROW} B per peer and row "
        f"({fmt_bytes(allowance)} here). The targets are checked here, in the benchmark, not by "
        "a timed unit test."
    )
    return f"{where}:\n\n{table(['target', 'measured', 'verdict'], rows, 'lll')}\n\n{note}\n"


def sweep_section(sweep: dict, image: str, threads) -> str:
    if not sweep:
        return "No sweep results in the JSON."
    ks = sorted({k for k, *_ in sweep})
    n = next(iter(sweep))[1]
    parts = [
        f"forward + backward, float32, N = {n}, {threads} threads; median times.\n\n"
        f"![time vs C per K]({image})"
    ]
    names = [c for c in CANDIDATES if any(key_[4] == c for key_ in sweep)]
    for k in ks:
        cs = sorted({key_[2] for key_ in sweep if key_[0] == k})
        rows = [
            [str(c)]
            + [
                fmt_time(sweep[m])
                if (m := (k, n, c, "float32", name, "forward_backward")) in sweep
                else "—"
                for name in names
            ]
            for c in cs
        ]
        parts.append(f"K = {k}:\n\n" + table(["C", *(f"`{x}`" for x in names)], rows))
    return "\n\n".join(parts)


def plot(sweep: dict, path: Path, threads) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({k for k, *_ in sweep})
    n = next(iter(sweep))[1]
    colors = dict(zip(CANDIDATES, ("tab:red", "tab:orange", "tab:blue", "tab:green"), strict=True))
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        for name in CANDIDATES:
            points = sorted(
                (key_[2], t) for key_, t in sweep.items() if key_[0] == k and key_[4] == name
            )
            if points:
                cs, ts = zip(*points, strict=True)
                ax.plot(cs, ts, "o-", color=colors[name], label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"K = {k}")
        ax.set_xlabel("classes C")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time per call [s]")
    axes[0][0].legend()
    fig.suptitle(f"DML loss forward + backward, float32, N = {n}, {threads} threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(args) -> str:
    timings, memory, loss, sweep, copy, peaks = load(args.timings, args.memory)
    threads = timings["machine_info"].get("fastdml", {}).get("threads", "?")
    if sweep:
        plot(sweep, args.plot, threads)
    image = Path(os.path.relpath(args.plot, args.out.parent)).as_posix()
    notes = args.notes.read_text().strip() if args.notes.exists() else "(no notes)"
    return f"""\
# fastdml benchmarks

The mutual loss on CPU (below; at the paper's small shapes in [Small shapes](#small-shapes)), on
the GPU ([GPU](#gpu)), the fused linear mutual loss
([Fused linear mutual loss](#fused-linear-mutual-loss)) and the cohort trainer
([Cohort trainer](#cohort-trainer)).

<!-- Generated by `python -m benchmarks.report` from benchmarks/results/*.json: do not edit.
     The Notes section is benchmarks/notes.md, copied verbatim. -->

## Machine

{machine_section(timings, memory)}

## How to reproduce

From the repository root, with the C++ op built (`pip install --no-build-isolation -e .`), on an
otherwise idle machine:

```bash
{COMMANDS}
```

## Targets

{targets_section(loss, peaks, threads)}
## Notes

{notes}

## What is measured

{method_section(copy)}

## Results per shape

{shape_sections(loss, peaks, copy)}

## Time vs number of classes

{sweep_section(sweep, image, threads)}
## Small shapes

{small_shapes_section(args.small_shapes)}

{sass_report.SECTION}

{sass_section(args.out)}
## GPU

{gpu_section(args.gpu)}
## Triton kernels compiled for sm_90 and sm_80

{compile_section()}
{extra_section(args.linear, "Fused linear mutual loss")}
{extra_section(args.trainer, "Cohort trainer")}
{extra_section(args.distributed, "Distributed cohorts")}"""


def gpu_section(path: Path) -> str:
    """The GPU run (benchmarks/gpu.sh's JSON lines, copied to benchmarks/results/): the benchmark
    tables, the correctness smoke, Triton's tile tuning and the hand-written notes."""
    if not path.exists():
        return (
            "Not measured yet: no GPU run has been made. `bash benchmarks/gpu.sh OUTDIR` on a "
            "CUDA machine builds the kernels, runs the GPU tests and benchmarks, and writes "
            "`OUTDIR/gpu_core.jsonl`; copied to `benchmarks/results/`, it is rendered here.\n"
        )
    parts = [gpu_report.render(gpu_report.load(str(path)))]
    smoke, tuning = RESULTS / "gpu_smoke.jsonl", RESULTS / "gpu_tune.jsonl"
    if smoke.exists():
        checks = gpu_report.render_smoke(gpu_report.load_lines(smoke))
        parts += ["### Correctness on the GPU", checks]
    if tuning.exists():
        parts += [
            "### Triton tile choices (forward + backward, ms)",
            gpu_report.render_tuning(gpu_report.load_lines(tuning)),
        ]
    notes = ROOT / "benchmarks" / "gpu_notes.md"
    if notes.exists():
        parts.append(notes.read_text().strip())
    return "\n\n".join(parts) + "\n"


SMALL_FORMS = ("fastdml", "MutualLoss")


def small_shapes_section(path: Path) -> str:
    """benchmarks/small_shapes.py's run: per shape, every candidate's median forward + backward,
    its ratios to torch.compile and from the eager loop, fastdml's per-call overhead (its median
    minus the op's own) and the ops each dispatches."""
    if not path.exists():
        return "Not measured yet: run `python -m benchmarks.small_shapes`.\n"
    run = json.loads(path.read_text())
    cpu = run["machine"].get("cpu_model", "?")
    threads = run["machine"].get("threads", "?")
    parts = [
        f"Forward + backward, float32, {threads} threads, {cpu}; medians of "
        f"{run['shapes'][0]['rounds']} interleaved rounds (`python -m benchmarks.small_shapes`). "
        "*overhead*: the median minus that of the fused op alone (`kernel`: the op called "
        "directly in inference mode, loss and gradient). *ops*: ATen and custom ops dispatched "
        "by one forward + backward, the autograd engine's included."
    ]
    header = ["candidate", "median", "÷ torch.compile", "eager_pairs ÷", "overhead", "ops"]
    for shape in [*run["shapes"], run["large"]]:
        found = shape["candidates"]
        kernel = found["kernel"]["median"]
        compiled = found["torch_compile"]["median"]
        eager = found.get("eager_pairs", {}).get("median")
        rows = []
        for name, entry in found.items():
            median = entry["median"]
            overhead = fmt_time(median - kernel) if name in SMALL_FORMS else ""
            ops = str(len(entry["ops"])) if "ops" in entry else ""
            rows.append(
                [
                    name,
                    fmt_time(median),
                    fmt_ratio(median / compiled),
                    fmt_ratio(eager / median) if eager else "—",
                    overhead,
                    ops,
                ]
            )
        title = f"### (K, N, C) = ({shape['K']}, {shape['N']}, {shape['C']})"
        parts += [title, table(header, rows)]
    steady = run.get("steady")
    if steady:
        overhead = steady["MutualLoss"] - steady["kernel"]
        parts.append(
            f"With warm caches, each called {steady['calls']} times back to back at "
            f"({steady['K']}, {steady['N']}, {steady['C']}): `MutualLoss` forward + backward "
            f"{fmt_time(steady['MutualLoss'])}, the kernel {fmt_time(steady['kernel'])}, a "
            f"per-call overhead of {fmt_time(overhead)}."
        )
    return "\n\n".join(parts) + "\n"


def compile_section() -> str:
    """Registers, spills and shared memory of the Triton specializations, per Triton version."""
    runs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("triton_compile_*.json"))]
    if not runs:
        return "Not measured yet: run `python -m benchmarks.triton_compile --out ...`.\n"
    counts = ", ".join(
        f"Triton {run['triton']}: {len(run['compiles'])} compiles in {run['seconds']:.0f} s"
        for run in runs
    )
    return (
        "Each Triton specialization of the pairwise covering set (`benchmarks/triton_compile.py`) "
        "compiled for sm_90 and sm_80 without a GPU, as CI does: registers a thread / spill "
        f"stores (bytes) / shared memory (bytes). {counts} (2 cores).\n\n"
        + triton_compile.render(runs)
        + "\n"
    )


def sass_section(out: Path) -> str:
    """The static SASS table as `python -m benchmarks.sass_report` last wrote it into `out` (its
    markers included), kept verbatim: that script compiles the kernels to make it."""
    begin, end = sass_report.MARKERS
    text = out.read_text() if out.exists() else ""
    if begin not in text or end not in text:
        return f"{begin}\nNot measured yet: run `python -m benchmarks.sass_report`.\n{end}\n"
    return text[text.index(begin) : text.index(end) + len(end)] + "\n"


def extra_section(path: Path, title: str) -> str:
    """A hand-written section (its own numbers and how they were measured), copied verbatim."""
    return f"## {title}\n\n{path.read_text().strip()}\n" if path.exists() else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timings", type=Path, default=RESULTS / "cpu.json")
    parser.add_argument("--memory", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--notes", type=Path, default=ROOT / "benchmarks" / "notes.md")
    parser.add_argument("--plot", type=Path, default=RESULTS / "time_vs_classes.png")
    parser.add_argument("--gpu", type=Path, default=RESULTS / "gpu_core.jsonl")
    parser.add_argument("--small-shapes", type=Path, default=RESULTS / "small_shapes.json")
    parser.add_argument("--linear", type=Path, default=ROOT / "benchmarks" / "linear_loss.md")
    parser.add_argument("--trainer", type=Path, default=ROOT / "benchmarks" / "trainer.md")
    parser.add_argument("--distributed", type=Path, default=ROOT / "benchmarks" / "distributed.md")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if not args.timings.exists():
        raise SystemExit(f"{args.timings} is missing: run the benchmarks first (see --help)")
    args.out.write_text(render(args))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot.exists() else ""))


if __name__ == "__main__":
    main()
