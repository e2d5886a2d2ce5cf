"""Per-epoch metrics of a run: CSV and JSON lines, and TensorBoard scalars when asked for.

A record is a flat mapping such as ``{"epoch": 3, "test_acc/peer0": 91.2, ...}``. The files are
rewritten from the whole history at every epoch (a few kilobytes), so a run resumed from a
checkpoint never repeats or loses a line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdml.data import require

Record = Mapping[str, Any]


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", newline="") as file:
        file.write(text)
    os.replace(temp, path)


class MetricsLog:
    """Writes ``metrics.csv`` and ``metrics.jsonl`` (and ``tensorboard/``) under `folder`."""

    def __init__(self, folder: str | Path, *, tensorboard: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # imported now, so a missing package stops the run before it trains, not after an epoch
        self._tensorboard = None
        if tensorboard:
            self._tensorboard = require("torch.utils.tensorboard", "tensorboard")
        self._writer = None

    def write(self, history: Sequence[Record]) -> None:
        """Writes the files for `history`; sends its last record to TensorBoard."""
        columns: list[str] = []
        for record in history:
            columns += [key for key in record if key not in columns]
        lines = "".join(json.dumps(dict(record)) + "\n" for record in history)
        _write_atomic(self.folder / "metrics.jsonl", lines)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        _write_atomic(self.folder / "metrics.csv", table.getvalue())
        if self._tensorboard is not None and history:
            self._scalars(history[-1])

    def _scalars(self, record: Record) -> None:
        if self._writer is None:
            # purge_step drops events a resumed run left after its checkpoint
            self._writer = self._tensorboard.SummaryWriter(
                str(self.folder / "tensorboard"), purge_step=record["epoch"]
            )
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, record["epoch"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
