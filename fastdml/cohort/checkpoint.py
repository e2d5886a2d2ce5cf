"""Checkpoint files: written atomically, read back with a clear error, and the RNG states in them.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the previous one, so a crash while writing leaves the previous checkpoint intact. It is read with
``weights_only=True``: only tensors and plain Python values, no arbitrary code.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdml.errors import CheckpointError

FORMAT = "fastdml-checkpoint"
VERSION = 1


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Writes `state` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            torch.save({"format": FORMAT, "version": VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by `save_checkpoint`; raises `CheckpointError` if `path` is
    missing, unreadable or not a fastdml checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    state = _read(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastdml checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer fastdml (checkpoint version {state['version']})"
        )
    return state


def load_peer_weights(path: str | Path, peer: int = 0) -> dict[str, Any]:
    """A model's weights from a fastdml checkpoint (peer `peer` of its cohort) or from a file
    holding a bare ``model.state_dict()``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    state = _read(path, "cpu")
    if isinstance(state, dict) and state.get("format") == FORMAT:
        cohort = state["cohort"]
        peers = cohort.get("peer_files", cohort.get("peers", []))  # a distributed run's: files
        if not 0 <= peer < len(peers):
            raise CheckpointError(f"{path} holds {len(peers)} peers, there is no peer {peer}")
        if "peer_files" in cohort:
            return load_checkpoint(path.parent / peers[peer])["peer"]
        return peers[peer]
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    raise CheckpointError(f"{path} holds neither a fastdml checkpoint nor a model state_dict")


def describe_layout(layout: Mapping[str, int]) -> str:
    """The layout of a distributed job's checkpoint, in words."""
    return (
        f"{layout['world_size']} ranks ({layout['replicas']} replicas a peer group) "
        f"training {layout['peers']} peers"
    )


def _read(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def rng_state() -> dict[str, Any]:
    """The states of every random generator a training run draws from."""
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
