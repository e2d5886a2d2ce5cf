"""`fastdml.lightning.MutualLearning` under a real `lightning.Trainer`, against `fastdml.Cohort`
on the same batches: per-peer options, clipping and schedules, both update orders, a frozen
teacher, bf16, the logged metrics, checkpoints, and DDP over two gloo processes."""

import importlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastdml import Cohort, LRSchedule, MutualLoss

lightning = pytest.importorskip("lightning")
from fastdml.lightning import MutualLearning  # noqa: E402  (after the skip)

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # Lightning's own use of torch.utils._pytree, deprecated in torch 2.13
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"),
]

CLASSES, FEATURES, BATCH = 5, 12, 16
EPOCHS = 2
# Each peer its own learning rate, weight decay, schedule and gradient-norm bound (peer 0's
# bound is well below its gradients' norm, so clipping changes every step).
OPTIONS = {
    "peer_options": [{"lr": 0.1, "weight_decay": 1e-3}, {"lr": 0.05, "momentum": 0.5}],
    "lr_schedule": [LRSchedule("multistep", milestones=(1,), gamma=0.5), None],
    "clip_norm": [0.3, None],
}
HERE = Path(__file__).resolve().parent


def peers(k=2, batchnorm=False):
    torch.manual_seed(0)
    made = []
    for i in range(k):
        width = 8 + 4 * i
        layers = [nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, CLASSES)]
        if batchnorm:
            layers.insert(1, nn.BatchNorm1d(width))
        made.append(nn.Sequential(*layers))
    return made


def dataset(rows=5 * BATCH, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=gen)
    return TensorDataset(x, torch.randint(0, CLASSES, (rows,), generator=gen))


def loader(data, batch_size=BATCH):
    return DataLoader(data, batch_size=batch_size)


def trainer(**options):
    """A Trainer on the CPU that prints and writes nothing it is not asked to."""
    defaults = {
        "max_epochs": EPOCHS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    return lightning.Trainer(**{**defaults, **options})


def cohort_run(models, criterion, data, epochs=EPOCHS, **options):
    """`Cohort.train_step` on the batches a Trainer's loader gives, epoch by epoch."""
    cohort = Cohort(models, criterion, device="cpu", **options)
    for _ in range(epochs):
        for x, y in loader(data):
            out = cohort.train_step(x, y)
        cohort.end_epoch()
    return cohort, out


def assert_same_parameters(a, b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert_close(p, q)


def assert_differ(a, b):
    """Far beyond float32 rounding (a bf16 run moves the weights by about 1e-3)."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    assert max((p - q).abs().max() for p, q in pairs) > 1e-4


CASES = {
    "simultaneous": ({}, {}),
    "alternating": ({"update": "alternating"}, {}),
    "bf16": ({}, {"precision": "bf16"}),
    "alternating-bf16": ({"update": "alternating"}, {"precision": "bf16"}),
}


@pytest.mark.parametrize("case", CASES)
def test_trainer_trains_as_the_cohort_does(case):
    options, cohort_only = CASES[case]
    criterion, data = MutualLoss(temperature=2.0), dataset()
    module = MutualLearning(peers(), criterion, **OPTIONS, **options)
    precision = "bf16-mixed" if cohort_only.get("precision") == "bf16" else "32-true"
    fit = trainer(precision=precision)
    fit.fit(module, loader(data))
    cohort, out = cohort_run(peers(), criterion, data, **OPTIONS, **options, **cohort_only)
    assert_same_parameters(module.peers, cohort.peers)
    steps_per_batch = 2 if options.get("update") == "alternating" else 1  # optimizer steps
    assert fit.global_step == EPOCHS * len(loader(data)) * steps_per_batch

    # The last step's logged terms are those of the cohort's last step.
    logged = fit.callback_metrics
    for k in range(2):
        assert_close(logged[f"train_ce/peer{k}"], out.ce[k])
        assert_close(logged[f"train_mimicry/peer{k}"], out.mimicry[k])
        assert_close(logged[f"train_acc/peer{k}"], 100.0 * out.correct[k] / out.count)
    assert "train_acc/ensemble" in logged

    # Neither the clipping nor the precision leaves the run as it would be without it.
    no_clip = {**OPTIONS, "clip_norm": None}
    unclipped, _ = cohort_run(peers(), criterion, data, **no_clip, **options, **cohort_only)
    assert_differ(unclipped.peers, module.peers)
    if cohort_only:
        fp32, _ = cohort_run(peers(), criterion, data, **OPTIONS, **options)
        assert_differ(fp32.peers, module.peers)


def test_frozen_teacher_stays_as_loaded():
    """Distillation: the student mimics a batch-norm teacher that is never stepped or put in
    training mode, with Adam."""
    criterion = MutualLoss(peer_weights=[[0, 1], [0, 0]])
    options = {"frozen": [1], "optimizer": "adam", "clip_norm": 0.5}
    student, teacher = peers(batchnorm=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = MutualLearning([student, teacher], criterion, **options)
    fit = trainer()
    fit.fit(module, loader(dataset()), loader(dataset(seed=2)))
    assert not teacher.training and student.training
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    cohort, _ = cohort_run(peers(batchnorm=True), criterion, dataset(), **options)
    assert_same_parameters(module.peers, cohort.peers)
    assert {f"val_acc/peer{k}" for k in range(2)} <= set(fit.callback_metrics)


def test_validation_logs_each_peer_and_the_ensemble():
    """The epoch means over batches of unequal size are those over the whole set."""
    criterion = MutualLoss(temperature=2.0)
    module = MutualLearning(peers(3), criterion, frozen=[2])
    val = dataset(rows=50, seed=2)  # batches of 16, 16, 16 and 2
    logged = trainer().validate(module, loader(val), verbose=False)[0]
    reference = Cohort(peers(3), criterion, frozen=[2], device="cpu").evaluate(loader(val))
    x, y = val.tensors
    with torch.no_grad():
        terms = criterion([peer(x) for peer in module.peers], y, return_components=True)
    for k in range(3):
        assert logged[f"val_ce/peer{k}"] == pytest.approx(terms.ce[k].item(), rel=1e-5)
        assert logged[f"val_ce/peer{k}"] == pytest.approx(reference.loss[k], rel=1e-5)
        assert logged[f"val_mimicry/peer{k}"] == pytest.approx(terms.mimicry[k].item(), rel=1e-5)
        assert logged[f"val_acc/peer{k}"] == pytest.approx(reference.accuracy[k], rel=1e-5)
    assert logged["val_acc/ensemble"] == pytest.approx(reference.ensemble_accuracy, rel=1e-5)
    assert len(logged) == 3 * 3 + 1


@pytest.mark.parametrize(
    "stop",
    [
        {"max_epochs": 1},  # the checkpoint written at the end of the epoch
        {"max_steps": 2 * 5},  # the one written after epoch 1's last batch, before its end
    ],
    ids=["epoch-end", "last-batch"],
)
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")  # post-step
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # a new Trainer's
def test_checkpoint_resumes_as_an_uninterrupted_run(stop, tmp_path):
    """Adam's moments, the schedules and the step count come back: the resumed run ends where
    an uninterrupted one does (the schedule halves the learning rates at epochs 1 and 2)."""
    options = {
        "optimizer": "adam",
        "peer_options": [{"lr": 0.01}, {"lr": 0.02}],
        "lr_schedule": LRSchedule("multistep", milestones=(1, 2), gamma=0.5),
    }
    data, val = dataset(), dataset(rows=2 * BATCH, seed=2)
    uninterrupted = MutualLearning(peers(), **options)
    trainer(max_epochs=3).fit(uninterrupted, loader(data), loader(val))

    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
        tmp_path, save_last=True, every_n_train_steps=stop.get("max_steps")
    )
    first = trainer(**stop, callbacks=[checkpoints], enable_checkpointing=True)
    first.fit(MutualLearning(peers(), **options), loader(data), loader(val))
    resumed = MutualLearning(peers(), **options)
    second = trainer(max_epochs=3)
    second.fit(resumed, loader(data), loader(val), ckpt_path=tmp_path / "last.ckpt")
    assert second.global_step == 3 * 5
    assert_same_parameters(resumed.peers, uninterrupted.peers)


# One rank of a DDP job: trains both update orders on its share of the batches and saves the
# peers (rank 0). Lightning gives each rank a DistributedSampler (shuffled, seed 0).
RANK = """
import sys
import torch
from test_lightning import BATCH_PER_RANK, DDP_OPTIONS, STRATEGIES, dataset, loader, peers, trainer
from fastdml.lightning import MutualLearning

for update, strategy in STRATEGIES.items():
    module = MutualLearning(peers(), update=update, **DDP_OPTIONS)
    fit = trainer(devices=2, strategy=strategy)
    fit.fit(module, loader(dataset(), batch_size=BATCH_PER_RANK), loader(dataset(seed=2)))
    if fit.global_rank == 0:
        torch.save(module.peers.state_dict(), f"{sys.argv[1]}/{update}.pt")
"""
DDP_OPTIONS = {"peer_options": [{"lr": 0.1}, {"lr": 0.05}], "clip_norm": [0.3, None]}
BATCH_PER_RANK = BATCH // 2
# Each alternating backward reaches one peer: DDP must expect parameters without gradients.
STRATEGIES = {"simultaneous": "ddp", "alternating": "ddp_find_unused_parameters_true"}


@pytest.mark.slow  # two processes that each import Lightning: 20 to 30 seconds
def test_ddp_over_two_gloo_processes_trains_as_the_cohort_on_whole_batches(tmp_path):
    """DDP averages the two ranks' gradients of equal shards, each peer is clipped after the
    all-reduce: the peers end as a single process's cohort trained on the joined batches."""
    from test_distributed import launch

    script = tmp_path / "rank.py"
    script.write_text(RANK)
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    results = launch(2, [script, tmp_path], env={"PYTHONPATH": path}, timeout=300)
    for status, _, err, _ in results:
        assert status == 0, err[-3000:]

    data = dataset()
    for update in STRATEGIES:
        cohort = Cohort(peers(), update=update, device="cpu", **DDP_OPTIONS)
        for epoch in range(EPOCHS):
            shards = []
            for rank in range(2):
                sampler = DistributedSampler(data, num_replicas=2, rank=rank, seed=0)
                sampler.set_epoch(epoch)
                shards.append(torch.tensor(list(sampler)).split(BATCH_PER_RANK))
            for rows in zip(*shards, strict=True):
                cohort.train_step(*data[torch.cat(rows)])
            cohort.end_epoch()
        trained = torch.load(tmp_path / f"{update}.pt")
        for name, value in cohort.peers.state_dict().items():
            assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=f"{update}: {name}")


def test_device_and_precision_belong_to_the_trainer():
    with pytest.raises(TypeError, match='precision="bf16-mixed"'):
        MutualLearning(peers(), precision="bf16")
    with pytest.raises(TypeError, match="accelerator= and devices="):
        MutualLearning(peers(), device="cpu")
    with pytest.raises(ValueError, match="update must be one of"):
        MutualLearning(peers(), update="sequential")


def test_the_example_runs(monkeypatch, capsys):
    example = HERE.parent.parent / "examples" / "lightning_mutual.py"
    monkeypatch.syspath_prepend(str(example.parent))
    monkeypatch.setattr(sys, "argv", [str(example), "--epochs", "1", "--train-size", "256"])
    runpy.run_path(str(example), run_name="__main__")
    assert "mutual (alpha=1)" in capsys.readouterr().out


def test_fastdml_does_not_import_lightning():
    code = "import sys, fastdml; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_lightning_the_import_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning` fails
    monkeypatch.delitem(sys.modules, "fastdml.lightning")
    with pytest.raises(ImportError, match=r"pip install fastdml\[lightning\]"):
        importlib.import_module("fastdml.lightning")
