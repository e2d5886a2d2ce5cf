"""Compiles every Triton specialization the fused ops launch, for real GPU targets, without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, what the CPU tests use) runs kernels as Python and
accepts code the compiler rejects; this check runs the compiler itself, with the ptxas Triton
bundles, for sm_90 and sm_80. The specializations come from the op's own launch code
(`kernel_launches` and `scale_launch` of fastdml.kernels.mutual_loss, called with meta tensors)
and Triton's own argument specialization, so what compiles here is what the op launches.

    python -m benchmarks.triton_compile [--jobs 2] [--out benchmarks/results/triton_compile.json]

Exits non-zero if any specialization fails. Writes, per specialization and target, the registers,
spilled bytes and shared memory of the compiled kernel, and prints a summary.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile
from triton.runtime.jit import create_function_from_signature

from fastdml.kernels import mutual_loss as km
from fastdml.loss.arguments import accumulation_dtype

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(TOOLS, "cuobjdump")
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MODES = tuple(km.MODE_IDS)
PEERS = (2, 3, 4, 8, 16)
# (rows, classes): few and many classes, rows and classes divisible by 16 or not (Triton
# specializes integers on it), and two split cases (C >= 2 * SPLIT_MIN_CLASSES, few rows).
SHAPES = (
    (128, 10),
    (64, 100),
    (256, 1000),
    (1024, 32000),
    (8192, 128256),
    (4, 2 * km.SPLIT_MIN_CLASSES),
    (7, 128256),
)
# The loss family's options (docs/loss.md) beyond the paper's loss: each divergence, and a
# mimicry-only loss of unlabeled rows with a normalizer; at K = 2 and 4, in float32 and bfloat16,
# the dtypes of the GPU targets. (None: the normalizer, a 0-dim tensor, goes in its place.)
FAMILY = (
    dict(divergence="reverse_kl"),
    dict(divergence="jsd", beta=0.3),
    dict(ce_weight=0.0, mimic_unlabeled=True, normalizer=None),
)
FAMILY_DTYPES = (torch.float32, torch.bfloat16)
FAMILY_PEERS = (2, 4)
# The family's constexprs at the paper's loss: left out of a specialization's description.
_PAPER_LOSS = dict(DIVERGENCE=0, CE=1, MIMIC_UNLABELED=False, NORMALIZER=False)


@dataclass(frozen=True)
class Specialization:
    """One distinct compile: a kernel, its Triton signature, constexprs, attributes and warps."""

    kernel: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    maxnreg: int | None

    def describe(self) -> str:
        named = dict(self.constexprs)
        keys = ("STAGE", "SINGLE_TILE", "K", "VEC", "LANES", "MODE", "HAS_T", "HAS_SMOOTHING")
        keys += ("COMPUTE_GRAD", "REDUCTION", "SCALE", "ACC", "PER_ROW")
        parts = [f"{key}={named[key]}" for key in keys if key in named]
        parts += [f"{key}={named[key]}" for key in _PAPER_LOSS if named.get(key, _PAPER_LOSS[key])
                  != _PAPER_LOSS[key]]  # fmt: skip
        pointers = sorted({t for _, t in self.signature if t.startswith("*")})
        options = f"warps={self.num_warps}" + (f" maxnreg={self.maxnreg}" if self.maxnreg else "")
        return f"{self.kernel} {' '.join(parts)} {options} {','.join(pointers)}"


@functools.cache
def _binder(fn) -> tuple:
    """The backend and Triton's argument binder of a kernel (made once: it is generated code)."""
    backend = make_backend(TARGETS["sm_90"])
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(fn, arguments: tuple, launch: km.Launch) -> Specialization:
    """The (signature, constexprs, attrs) Triton derives when `launch` runs with `arguments`."""
    backend, binder = _binder(fn)
    kwargs = dict(launch.constexprs, **launch.options)
    bound, specialization, options = binder(*arguments, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = {i: p.name for i, p in enumerate(fn.params)}
    return Specialization(
        kernel=fn.__name__,
        signature=tuple(signature.items()),
        constexprs=tuple((names[path[0]], v) for path, v in sorted(constexprs.items())),
        attrs=tuple((path, tuple(map(tuple, a))) for path, a in sorted(attrs.items())),
        num_warps=launch.num_warps,
        maxnreg=launch.maxnreg,
    )


def specializations() -> list[Specialization]:
    """Every distinct specialization over modes, dtypes, options, K, shapes, reductions and
    grad_scales; and the loss family's (FAMILY) over modes, options, shapes and reductions."""
    found: dict[Specialization, None] = {}
    meta = dict(device="meta")
    paper = itertools.product(MODES, DTYPES, (1.0, 2.0), (0.0, 0.1), (False, True), PEERS, [{}])
    family = itertools.product(
        MODES, FAMILY_DTYPES, (1.0, 2.0), (0.0, 0.1), (False, True), FAMILY_PEERS, FAMILY
    )
    for mode, dtype, temperature, smoothing, grad, k, options in itertools.chain(paper, family):
        acc = accumulation_dtype(dtype)
        weights = torch.empty(k, k, dtype=acc, **meta) if mode == "weights" else None
        if "normalizer" in options:
            options = dict(options, normalizer=torch.empty((), dtype=acc, **meta))
        for rows, classes in SHAPES:
            logits = torch.empty(k, rows, classes, dtype=dtype, **meta)
            target = torch.empty(rows, dtype=torch.int64, **meta)
            # Without grad_scale (a loss), with one value (the float16 backward of a reduced
            # loss) or one per row (that of reduction "none", and the fused linear loss). A
            # normalizer divides a mean only.
            for reduction, grad_scale in (
                ("mean", None), ("sum", None), ("none", None),
                ("mean", torch.empty((), dtype=acc, **meta)),
                ("none", torch.empty(k, rows, dtype=acc, **meta)),
            ):  # fmt: skip
                if reduction != "mean" and "normalizer" in options:
                    continue
                _, launches = km.kernel_launches(
                    logits, target, weights, grad_scale, mode, temperature, 0.5, smoothing, -100,
                    reduction, grad, **options,
                )  # fmt: skip
                for launch, arguments in launches:
                    found[specialize(km._mutual_loss_kernel, arguments, launch)] = None
            if grad and not options:
                grad_buffer = torch.empty(k, rows, classes, dtype=dtype, **meta)
                for grad_loss in (torch.empty((), dtype=acc, **meta), torch.empty(k, rows, **meta)):
                    launch, arguments = km.scale_launch(grad_buffer, grad_loss.to(acc))
                    found[specialize(km._scale_grad_kernel, arguments, launch)] = None
    return list(found)


def _axes(spec: Specialization) -> list[tuple[str, object]]:
    """The values a specialization takes on each axis of variation."""
    return [
        *((f"{spec.kernel}.{name}", value) for name, value in spec.constexprs),
        (f"{spec.kernel}.logits", spec.signature[0][1]),
        (f"{spec.kernel}.num_warps", spec.num_warps),
        (f"{spec.kernel}.maxnreg", spec.maxnreg),
    ]


def covering(specs: list[Specialization]) -> list[Specialization]:
    """A subset in which every pair of values of any two axes (stage, mode, options, dtypes, K,
    tile, warps...) that occurs in `specs` occurs at least once: a defect that needs one or two
    of them to show (as a stage that does not compile, or a tile that spills) shows here, at a
    small fraction of the compiles. Greedy and deterministic: the specialization that covers the
    most missing pairs, next."""
    pairs_of = [set(itertools.combinations(_axes(spec), 2)) for spec in specs]
    missing = set().union(*pairs_of)
    chosen = []
    while missing:
        best = max(range(len(specs)), key=lambda i: len(pairs_of[i] & missing))
        chosen.append(specs[best])
        missing -= pairs_of[best]
    return chosen


def compile_for(spec: Specialization, target_name: str):
    """The specialization compiled for a target (a CompiledKernel; raises the compiler's error)."""
    fn = getattr(km, spec.kernel)
    index = {p.name: i for i, p in enumerate(fn.params)}
    source = ASTSource(
        fn=fn,
        signature=dict(spec.signature),
        constexprs={(index[name],): value for name, value in spec.constexprs},
        attrs={path: [list(a) for a in attr] for path, attr in spec.attrs},
    )
    options = dict(num_warps=spec.num_warps, maxnreg=spec.maxnreg)
    return triton_compile(source, target=TARGETS[target_name], options=options)


def _compile(job: tuple[Specialization, str]) -> dict:
    spec, target_name = job
    row = dict(specialization=spec.describe(), target=target_name)
    start = time.perf_counter()
    try:
        kernel = compile_for(spec, target_name)
    except Exception as error:  # any compiler error is a failure to report
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
    else:
        row.update(shared_bytes=kernel.metadata.shared, **resource_usage(kernel.asm["cubin"]))
        if row["stack_bytes"]:
            row.update(spills(kernel.asm["ptx"], TARGETS[target_name].arch))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def resource_usage(cubin: bytes) -> dict:
    """Registers and spill stack of the cubin, from the cuobjdump that Triton bundles (the compiled
    kernel reads them only when it is loaded on a device)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", file.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text!r}")
    return dict(registers=int(found[1]), stack_bytes=int(found[2]), local_bytes=int(found[3]))


def spills(ptx: str, arch: int) -> dict:
    """Spill stores and loads, from ptxas -v of the PTX (a stack frame alone is no spill)."""
    from triton.backends.nvidia import compiler

    try:
        ptxas = compiler.get_ptxas(arch)
    except TypeError:  # Triton 3.6 has one ptxas
        ptxas = compiler.get_ptxas()
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        target = f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}"
        command = [ptxas.path, "-v", target, source, "-o", os.path.join(folder, "kernel.cubin")]
        text = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if found is None:
        raise RuntimeError(f"no spill counts in ptxas -v's output: {text!r}")
    return dict(spill_store_bytes=int(found[1]), spill_load_bytes=int(found[2]))


def render(runs: list[dict]) -> str:
    """A Markdown table of the compiles of one or more runs (one per Triton version): registers,
    spill stores and shared memory of each specialization on each target."""
    columns = [(run["triton"], target) for run in runs for target in TARGETS]
    cells: dict[str, dict[tuple, str]] = {}
    for run in runs:
        for row in run["compiles"]:
            cell = "error" if "error" in row else f"{row['registers']} / "
            if "error" not in row:
                cell += f"{row.get('spill_store_bytes', 0)} / {row['shared_bytes']}"
            cells.setdefault(row["specialization"], {})[(run["triton"], row["target"])] = cell
    header = "| specialization | " + " | ".join(f"{t} {v}" for v, t in columns) + " |"
    lines = [header, "|---" + "|---:" * len(columns) + "|"]
    for name in sorted(cells):
        values = [cells[name].get(column, "") for column in columns]
        lines.append(f"| `{name}` | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument(
        "--all", action="store_true", help="every specialization, not the pairwise covering set"
    )
    parser.add_argument("--out", help="JSON of every compile, with its resources")
    args = parser.parse_args(argv)
    # A cache of its own, so that every kernel is really compiled (and timed) in this run.
    cache = tempfile.TemporaryDirectory()
    os.environ["TRITON_CACHE_DIR"] = cache.name
    start = time.perf_counter()
    every = specializations()
    specs = every if args.all else covering(every)
    jobs = [(spec, target) for spec in specs for target in args.targets]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_compile, jobs, chunksize=4))
    failures = [row for row in rows if "error" in row]
    seconds = time.perf_counter() - start
    print(
        f"triton {triton.__version__}: {len(specs)} of {len(every)} specializations "
        f"x {len(args.targets)} targets, "
        f"{len(failures)} failed, {seconds:.0f} s with {args.jobs} jobs"
    )
    for row in failures:
        print(f"FAILED {row['target']} {row['specialization']}: {row['error']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        summary = dict(triton=triton.__version__, seconds=round(seconds, 1), compiles=rows)
        with open(args.out, "w") as file:
            json.dump(summary, file, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
