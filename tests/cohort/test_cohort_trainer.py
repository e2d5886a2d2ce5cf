"""The trainer's epochs, records and checkpoints: a run stopped mid-epoch and resumed ends with
the same parameters as one never stopped; checkpoints are atomic and never overwritten."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from fastdml.cohort.checkpoint import (
    load_checkpoint,
    load_peer_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastdml.cohort.cohort import Cohort
from fastdml.cohort.optim import LRSchedule
from fastdml.cohort.trainer import Trainer
from fastdml.errors import CheckpointError, ConfigError, UserError

FEATURES, CLASSES = 6, 4


def make_cohort(update="simultaneous"):
    torch.manual_seed(0)
    peers = [
        nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, CLASSES))
        for _ in range(2)
    ]
    return Cohort(peers, update=update, lr_schedule=LRSchedule("cosine", epochs=3))


def tensors(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


class NoisyPairs(torch.utils.data.Dataset):
    """A map-style dataset that draws from the global torch RNG, like random augmentation."""

    def __init__(self):
        self.x, self.y = tensors()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(FEATURES), self.y[i]


class Stop(Exception):
    pass


def stop_at(monkeypatch, call):
    """Makes the `call`-th train step raise, as a crash would stop the run there."""
    calls = [0]
    original = Cohort.train_step

    def step(self, x, y):
        calls[0] += 1
        if calls[0] == call:
            raise Stop
        return original(self, x, y)

    monkeypatch.setattr(Cohort, "train_step", step)


def train(out, data, *, resume=False, **kwargs):
    options = dict(epochs=3, batch_size=8, checkpoint_every=3, progress=False, plots=False)
    trainer = Trainer(
        make_cohort(), data, tensors(20, seed=1), out=out, resume=resume, **{**options, **kwargs}
    )
    trainer.run()
    return trainer


def shuffled_by_global_rng():
    return torch.utils.data.DataLoader(NoisyPairs(), batch_size=8, shuffle=True)


@pytest.mark.parametrize("make_data", [tensors, NoisyPairs, shuffled_by_global_rng])
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, monkeypatch, make_data):
    torch.manual_seed(123)
    whole = train(tmp_path / "whole", make_data())
    torch.manual_seed(123)
    stop_at(monkeypatch, 13)  # epoch 2 of 8 steps, step 5; the last checkpoint is at step 12
    with pytest.raises(Stop):
        train(tmp_path / "cut", make_data())
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["trainer"]
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 4, 12)
    torch.manual_seed(999)  # the resumed run takes its RNG states from the checkpoint
    resumed = train(tmp_path / "cut", make_data(), resume=True)
    pairs = zip(whole.cohort.peers.parameters(), resumed.cohort.peers.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)

    def untimed(history):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in history]

    assert untimed(resumed.history) == untimed(whole.history)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_records_and_plots(tmp_path):
    trainer = train(tmp_path, tensors(), plots=True, checkpoint_every=None)
    with open(tmp_path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert int(rows[-1]["step"]) == 24
    expected = [
        "train_loss/peer1",
        "train_mimicry/peer0",
        "train_acc/peer0",
        "lr/peer1",
        "test_acc/peer0",
        "test_acc/ensemble",
        "test_entropy/peer1",
        "test_loss/ensemble",
    ]
    assert set(expected) <= set(rows[0])
    last = trainer.history[-1]
    assert float(rows[-1]["test_acc/ensemble"]) == pytest.approx(last["test_acc/ensemble"])
    assert last["lr/peer0"] == pytest.approx(0.1 * LRSchedule("cosine", epochs=3)(2))
    loss = last["train_ce/peer0"] + last["train_mimicry/peer0"]  # alpha = T = 1
    assert last["train_loss/peer0"] == pytest.approx(loss)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_an_existing_checkpoint_is_never_overwritten(tmp_path):
    train(tmp_path, tensors(), epochs=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="exists; resume it"):
        train(tmp_path, tensors(), epochs=1)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(tmp_path / "empty", tensors(), resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write to"):
        train(tmp_path / "file" / "run", tensors())


def test_resume_of_another_cohort_is_refused(tmp_path):
    train(tmp_path, tensors(), epochs=1)
    other = Cohort([nn.Linear(FEATURES, CLASSES), nn.Linear(FEATURES, CLASSES)])
    with pytest.raises(CheckpointError, match="does not fit this cohort"):
        Trainer(other, tensors(), epochs=2, out=tmp_path, resume=True, progress=False)


def test_epochs_past_the_end_of_a_cosine_schedule_are_refused(tmp_path):
    """The cohort's cosine schedule ends at epoch 3 (lr 0 after it), in a new run or resumed."""
    with pytest.raises(ConfigError, match="epochs 4-5 would train at lr 0; make the schedule"):
        train(tmp_path / "new", tensors(), epochs=5)
    assert not (tmp_path / "new" / "checkpoint.pt").exists()
    train(tmp_path / "run", tensors(), epochs=2)
    with pytest.raises(ConfigError, match="epoch 4 would train at lr 0; the checkpoint keeps"):
        train(tmp_path / "run", tensors(), epochs=4, resume=True)
    assert train(tmp_path / "run", tensors(), resume=True).epoch == 3  # within the schedule


def test_tensorboard_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install tensorboard"):
            train(tmp_path, tensors(), tensorboard=True)
        return
    train(tmp_path, tensors(), tensorboard=True, epochs=1)
    assert any((tmp_path / "tensorboard").iterdir())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"cohort": {"peers": []}, "value": 1}, path)

    def crash(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"value": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a zip file" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 3}, foreign)
    with pytest.raises(CheckpointError, match="not a fastdml checkpoint"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.pt"
    save_checkpoint({"version": 99}, newer)
    with pytest.raises(CheckpointError, match="newer fastdml"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="neither a fastdml checkpoint nor"):
        load_peer_weights(foreign)


def test_load_peer_weights(tmp_path):
    model = nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert torch.equal(load_peer_weights(tmp_path / "bare.pt")["weight"], model.weight)
    save_checkpoint(
        {"cohort": {"peers": [{"w": torch.zeros(1)}, model.state_dict()]}}, tmp_path / "run.pt"
    )
    assert torch.equal(load_peer_weights(tmp_path / "run.pt", 1)["bias"], model.bias)
    with pytest.raises(CheckpointError, match="there is no peer 2"):
        load_peer_weights(tmp_path / "run.pt", 2)


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    draws = torch.rand(3), np.random.rand(3), random.random()  # noqa: NPY002
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])  # noqa: NPY002
    assert random.random() == draws[2]
