"""Reruns every command whose output README.md and docs/*.md quote, and rewrites the quotes.

A quoted output sits between two markers, the first naming its command:

    <!-- output: fastdml compare -->
    ```
    ...what the command printed...
    ```
    A line naming the machine, and what varies from machine to machine.
    <!-- /output -->

Quoted outputs go stale as the code changes; this script is the one way they are written, so
that each can be checked by running it again. Every command runs on the CPU in a fresh temporary
folder, one after the other (so they do not compete for the cores), from the repository root's
installed fastdml:

    python docs/regenerate.py                  # every quoted output
    python docs/regenerate.py --only compare   # those whose command contains "compare"
    python docs/regenerate.py --list           # the quoted commands and where they are
    python docs/regenerate.py --threads 1      # one torch thread per command
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- output: (?P<command>.+?) -->\n)(?P<body>.*?)(<!-- /output -->)", re.S)


@dataclass(frozen=True)
class Command:
    """A quoted command: what to run, and what in its output differs between machines."""

    argv: tuple[str, ...]
    varies: str


FLOAT_ORDER = (
    "float sums are reduced in another order on other CPUs, thread counts and torch versions, "
    "and training carries the difference forward"
)
COMMANDS: dict[str, Command] = {
    "fastdml compare": Command(
        ("fastdml", "compare"),
        "On other machines the accuracies differ, in the last digits or somewhat more: "
        f"{FLOAT_ORDER}. "
        "The time varies with the machine and its load.",
    ),
    "python examples/mutual_lm.py": Command(
        (sys.executable, str(ROOT / "examples" / "mutual_lm.py")),
        "On other machines the perplexities differ, in the last digits or somewhat more: "
        f"{FLOAT_ORDER}. The time in the last line varies with the machine and its load.",
    ),
}


def documents() -> list[Path]:
    """The files that may quote outputs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def quoted_commands(path: Path) -> list[str]:
    """The commands whose outputs `path` quotes, in order."""
    return [m["command"] for m in BLOCK.finditer(path.read_text(encoding="utf-8"))]


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (the first core's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "an unknown CPU"


def machine(threads: int | None) -> str:
    """The machine in words: the CPU, its cores, torch's version and the commands' threads."""
    import torch  # here, so that --list works without torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or torch.get_num_threads()
    return (
        f"{cpu_model()}, {cores} cores, torch {torch.__version__} with {threads} "
        f"thread{'s' if threads > 1 else ''}, Python {sys.version.split()[0]}"
    )


def run(command: str, where: str, threads: int | None) -> tuple[str, float, float]:
    """Runs `command` on the CPU in a fresh temporary folder; returns its stdout, its seconds and
    the load average before it started (other jobs slow it down)."""
    spec = COMMANDS[command]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    folder = tempfile.mkdtemp(prefix="fastdml-regenerate-")
    try:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        result = subprocess.run(
            spec.argv, cwd=folder, env=env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"{command!r} (quoted in {where}) exited with {result.returncode}")
    return result.stdout.replace(folder, "."), seconds, load


def block(command: str, output: str, seconds: float, load: float, machine_line: str) -> str:
    """The text between the markers: the output fenced, then the machine and what varies."""
    if not output.endswith("\n"):
        output += "\n"
    return (
        f"```\n{output}```\n\n"
        f"Run by `python docs/regenerate.py` in {seconds:.0f} s on {machine_line}; "
        f"load average {load:.1f} at the start. "
        f"{COMMANDS[command].varies}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="rerun only the commands that contain this text")
    parser.add_argument("--list", action="store_true", help="list the quoted commands and exit")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for the commands (OMP_NUM_THREADS); default: torch's own choice. "
        "On a machine that other jobs load, 1 thread avoids OpenMP's threads waiting on each other",
    )
    args = parser.parse_args(argv)

    quotes = {path: quoted_commands(path) for path in documents()}
    unknown = {c for commands in quotes.values() for c in commands if c not in COMMANDS}
    if unknown:
        raise SystemExit(f"quoted outputs of commands this script cannot run: {sorted(unknown)}")
    if args.list:
        for path, commands in quotes.items():
            for command in commands:
                print(f"{path.relative_to(ROOT)}: {command}")
        return

    machine_line = machine(args.threads)
    outputs: dict[str, tuple[str, float, float]] = {}
    for path, commands in quotes.items():
        wanted = [c for c in commands if args.only is None or args.only in c]
        if not wanted:
            continue
        where = str(path.relative_to(ROOT))
        for command in wanted:
            if command not in outputs:  # a command quoted twice runs once
                print(f"running {command!r} ({where})", flush=True)
                outputs[command] = run(command, where, args.threads)

        def rewrite(match: re.Match[str], wanted: list[str] = wanted) -> str:
            command = match["command"]
            if command not in wanted:
                return match[0]
            text = block(command, *outputs[command], machine_line)
            return f"{match[1]}{text}{match[4]}"

        path.write_text(BLOCK.sub(rewrite, path.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"rewrote {where}", flush=True)


if __name__ == "__main__":
    main()
