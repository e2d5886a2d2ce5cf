"""A description of the machine and software a benchmark ran on, stored with its results."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch

import fastdml


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe() -> dict[str, object]:
    cpu = _cpuinfo()
    flags = cpu.get("flags", "").split()
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"family {cpu.get('cpu family', '?')}, model {cpu.get('model', '?')}",
        "cpu_simd": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "fastdml_backends": fastdml.available_backends(),
    }


def report_head(**settings: object) -> dict[str, object]:
    """The first fields of a benchmark's JSON: when it ran, on what, its settings, and the load
    average as it started (with others on the machine, the times are not the machine's own)."""
    return {
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(),
        **settings,
        "load_average_before": os.getloadavg(),
    }
