"""benchmarks/gpu_ncu.py's reading of Nsight Compute's CSV (no GPU needed)."""

from __future__ import annotations

import csv
import io

import pytest

from benchmarks import gpu_ncu

K, N, C = gpu_ncu.SHAPE
LOGIT_BYTES = K * N * C * 4  # float32
KERNEL = "void mutual_loss_kernel<float, 4, 4>(KernelArgs<float>)"
COLUMNS = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream"]
COLUMNS += ["Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name"]
COLUMNS += ["Metric Unit", "Metric Value"]
METRICS = [  # (name, unit, value) as ncu prints them, thousands separators included
    ("dram__bytes_read.sum", "Mbyte", f"{LOGIT_BYTES * 1.02 / 1e6:,.2f}"),
    ("dram__bytes_write.sum", "Gbyte", f"{LOGIT_BYTES / 1e9:.6f}"),
    ("smsp__inst_executed.sum", "inst", f"{K * N * C * 25 // 32:,}"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "%", "23.5"),
    ("gpu__time_duration.sum", "msecond", "2.5"),
]


def ncu_output(metrics: list[tuple[str, str, str]]) -> str:
    """ncu --csv with --metrics: its progress lines, then one row per kernel and metric."""
    out = io.StringIO()
    out.write('==PROF== Profiling "mutual_loss_kernel": 0%....50%....100% - 1 pass\n')
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(COLUMNS)
    for name, unit, value in metrics:
        fixed = ["0", "123", "python", "host", KERNEL, "1", "7", "(256, 1, 1)", "(264, 1, 1)"]
        writer.writerow([*fixed, "0", "9.0", "Command line profiler metrics", name, unit, value])
    return out.getvalue()


def test_parse_relates_the_counters_to_the_logits() -> None:
    (record,) = gpu_ncu.parse(ncu_output(METRICS), "float32")
    assert record["kernel"] == KERNEL
    assert record["logit_bytes"] == LOGIT_BYTES
    assert record["dram_read_per_logits"] == pytest.approx(1.02, rel=1e-6)
    assert record["dram_write_per_logits"] == pytest.approx(1.0, rel=1e-6)
    assert record["instructions_per_logit"] == pytest.approx(25.0, rel=1e-6)
    assert record["warps_active_pct"] == 23.5
    assert record["duration"] == pytest.approx(2.5e-3)


def test_parse_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="no ncu table"):
        gpu_ncu.parse("==PROF== No kernels were profiled.\n", "float32")
    furlongs = [(name, "furlong" if unit == "Mbyte" else unit, v) for name, unit, v in METRICS]
    with pytest.raises(ValueError, match="unit 'furlong'"):
        gpu_ncu.parse(ncu_output(furlongs), "float32")
