"""Peak extra memory of each candidate, one fresh process per (shape, dtype, candidate, pass).

From the repository root:

    python -m benchmarks.peak_memory --out benchmarks/results/memory.json

Each case runs in a new Python process (``--case K,N,C,dtype,candidate,pass`` prints one JSON
line): it creates the inputs, runs the pass once to warm up (compiling torch_compile), drops the
gradient, resets the process's peak resident set size VmHWM (writing "5" to
/proc/self/clear_refs), reads VmRSS, runs the pass once more and reads VmHWM. Peak extra = VmHWM -
VmRSS before the call: the memory the call needs on top of its inputs, the gradient it returns
included. glibc's malloc is first told to map every block of 64 KiB or more on its own (mallopt
M_MMAP_THRESHOLD), so freed buffers go back to the system and memory the warm-up freed cannot hide
what the call needs. Linux updates RSS in batches of pages: differences under about 1 MiB are
noise. Linux (/proc) and glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 16
ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(k: int, n: int, c: int, dtype: str, name: str, pass_: str) -> dict[str, object]:
    """Runs in the child process: the peak extra resident memory of one call, in bytes."""
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    import torch

    from benchmarks import candidates, cases

    cases.set_threads()
    logits, target = cases.inputs((k, n, c), dtype)
    candidate = candidates.make(name)
    z = logits.detach().requires_grad_(pass_ == "forward_backward")

    def call():
        if pass_ == "forward":
            with torch.no_grad():
                candidate(z, target)
        else:
            candidate(z, target).backward()

    call()  # the warm-up: compiles torch_compile, initialises what is initialised once
    z.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    before = _status_kib("VmRSS")
    call()
    peak = _status_kib("VmHWM")
    return {
        "K": k,
        "N": n,
        "C": c,
        "dtype": dtype,
        "candidate": name,
        "pass": pass_,
        "threads": torch.get_num_threads(),
        "rss_before_bytes": before * 1024,
        "peak_rss_bytes": peak * 1024,
        "peak_extra_bytes": (peak - before) * 1024,
    }


def run_in_subprocess(module: str, case: str) -> dict[str, object]:
    """`python -m module --case case` in a fresh process (a peak RSS of its own); its last line
    of output, as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", module, "--case", case],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_case(k: int, n: int, c: int, dtype: str, name: str, pass_: str) -> dict[str, object]:
    """Measures one case in a fresh process."""
    return run_in_subprocess("benchmarks.peak_memory", f"{k},{n},{c},{dtype},{name},{pass_}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/memory.json")
    parser.add_argument("--case", help="K,N,C,dtype,candidate,pass: measure one case, print JSON")
    args = parser.parse_args()

    if args.case:
        k, n, c, dtype, name, pass_ = args.case.split(",")
        print(json.dumps(measure(int(k), int(n), int(c), dtype, name, pass_)))
        return

    from benchmarks import candidates, cases, machine

    cases.set_threads()
    results = []
    for shape in cases.SHAPES:
        for dtype in cases.DTYPES:
            for name in candidates.names():
                for pass_ in cases.PASSES:
                    results.append(run_case(*shape, dtype, name, pass_))
                    extra = results[-1]["peak_extra_bytes"] / 2**20
                    print(f"{cases.shape_id(shape)} {dtype} {name} {pass_}: {extra:.1f} MiB")
    report = {
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.describe(),
        "quick": cases.QUICK,
        "method": "VmHWM - VmRSS around one call after a warm-up, in a fresh process, with "
        f"mallopt(M_MMAP_THRESHOLD, {MMAP_THRESHOLD})",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
