"""The `fastdml` command end to end on tiny runs; user errors; a real kill and resume."""

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from fastdml.cli.commands import main
from fastdml.cohort.checkpoint import load_checkpoint, save_checkpoint
from fastdml.models import build_model

TINY = ["--dataset", "digits", "--train-samples", "256", "--batch-size", "32", "--no-progress"]


def run(capsys, *argv):
    """main(argv): (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_train_from_a_config_file_then_resume_for_more_epochs(tmp_path, capsys):
    config = {
        "dataset": "mnist1d",
        "train_samples": 300,
        "peers": ["mlp", {"arch": "cnn1d", "channels": 8, "lr": 0.02}],
        "mode": "dml_e",
        "temperature": 2.0,
        "update": "alternating",
        "lr_schedule": ["multistep", "constant"],  # a cosine run cannot be extended
        "milestones": [1],
        "precision": "bf16",
        "epochs": 2,
        "out": str(tmp_path / "run"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    status, out, err = run(capsys, "train", "--config", tmp_path / "run.yaml", "--no-progress")
    assert status == 0, err
    assert out.startswith("epoch 2: test accuracy (%) peer0 ") and "ensemble" in out
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"checkpoint.pt", "metrics.csv", "metrics.jsonl", "curves.png"} <= files
    first = metrics(tmp_path / "run")
    assert [r["epoch"] for r in first] == [1, 2] and first[0]["lr/peer1"] == 0.02
    stored = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert stored["peers"][1] == {"arch": "cnn1d", "channels": 8, "lr": 0.02}
    status, out, err = run(
        capsys, "train", "--out", tmp_path / "run", "--resume", "--epochs", 3, "--no-progress"
    )
    assert status == 0, err
    assert out.startswith("epoch 3:")
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    assert metrics(tmp_path / "run")[:2] == first


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_only_on_a_terminal_and_the_final_accuracy_either_way(
    tmp_path, capsys, monkeypatch, terminal
):
    """Redirected to a file, tqdm's bars would write a line per update (tqdm's convention: off
    unless a terminal); with them on, the command still ends with the accuracy line."""
    if terminal:
        monkeypatch.setattr(sys, "stderr", Terminal())
    argv = [a for a in TINY if a != "--no-progress"]
    status, out, err = run(capsys, "train", *argv, "--epochs", 2, "--out", tmp_path / "run")
    assert status == 0, err
    assert out.startswith("epoch 2: test accuracy (%) peer0 ") and len(out.splitlines()) == 2
    if terminal:
        assert "epochs: 100%|" in sys.stderr.getvalue()
    else:
        assert err == ""


def test_resume_past_the_end_of_a_cosine_schedule_is_refused(tmp_path, capsys):
    """The checkpoint keeps the schedule of 2 epochs: a third would train at lr 0."""
    out = tmp_path / "run"
    status, _, err = run(capsys, "train", *TINY, "--train-samples", 64, "--epochs", 2, "--out", out)
    assert status == 0, err
    before = (out / "checkpoint.pt").read_bytes()
    status, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 3, "--no-progress")
    assert status == 2 and err.count("\n") == 1, err
    assert "cosine learning-rate schedule ends at epoch 2, so epoch 3 would train at lr 0" in err
    assert "resume with epochs <= 2, or train 3 epochs as a new run" in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_compare_writes_a_table_results_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        *TINY,
        "--peers",
        "mlp,mlp,mlp",
        "--epochs",
        2,
        "--seeds",
        "0,1",
        "--modes",
        "independent,dml,dml_e,distill",
        "--teacher",
        "cnn1d",
        "--out",
        out,
    ]
    status, stdout, err = run(capsys, "compare", *argv)
    assert status == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("test accuracy (%) on digits after 2 epochs, peers mlp, mlp, mlp")
    assert lines[1].split() == ["mode", "peer0", "peer1", "peer2", "ensemble", "teacher"]
    assert [line.split()[0] for line in lines[2:6]] == ["independent", "dml", "dml_e", "distill"]
    assert "±" in lines[2] and lines[2].rstrip().endswith("-")  # no teacher there
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and len(results["runs"]["dml"]) == 2
    summary = results["summary"]["dml"]["ensemble"]
    values = [run["test_acc"]["ensemble"] for run in results["runs"]["dml"]]
    assert summary["mean"] == pytest.approx(sum(values) / 2)
    assert (out / "compare.png").stat().st_size > 10_000
    for mode in ("independent", "dml", "dml_e", "distill", "teacher"):
        assert (out / mode / "seed1" / "metrics.csv").exists()
    # distillation's frozen teacher is the one trained alone first, loaded from its checkpoint
    teacher = load_checkpoint(out / "teacher" / "seed0" / "checkpoint.pt")["cohort"]["peers"][0]
    distill = load_checkpoint(out / "distill" / "seed0" / "checkpoint.pt")["cohort"]["peers"][3]
    assert all(torch.equal(teacher[k], distill[k]) for k in teacher)
    status, _, err = run(capsys, "compare", *TINY, "--epochs", 1, "--out", out)
    assert status == 2 and "--resume" in err
    # resumed: the finished runs are read back, not trained again
    status, again, err = run(capsys, "compare", *argv, "--resume")
    assert status == 0 and again == stdout
    status, _, err = run(capsys, "compare", *argv, "--resume", "--lr", "0.5")
    assert status == 2 and "different run: lr is 0.05 there, 0.5 here" in err


USER_ERRORS = [
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--peers", "mlp,vgg"], "unknown architecture 'vgg'"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--epochs", "many"], "invalid int value"),
    (["train", "--mode", "selfish"], "unknown mode 'selfish'"),
    (["train", "--precision", "fp16", "--device", "cpu"], "needs a CUDA device"),
    (["train", "--device", "foo"], "device 'foo' cannot be used here"),
    (["train", "--lr", "0.1,0.2,0.3"], "one value or one per trained peer (2)"),
    (["train", "--mode", "distill"], "needs a frozen teacher"),
    (["train", "--teacher", "cnn1d"], "a frozen teacher is for mode 'distill'"),
    (["train", "--config", "missing.yaml"], "cannot read config file"),
    (["train", "--resume"], "no checkpoint at"),
    (["compare", "--modes", "dml,distill"], "needs a teacher"),
]


@pytest.mark.parametrize("argv, message", USER_ERRORS, ids=[e[1][:24] for e in USER_ERRORS])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    command, *options = argv
    status, out, err = run(
        capsys, command, *TINY, "--out", tmp_path / "out", "--epochs", 1, *options
    )
    assert status == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_checkpoint_user_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", *TINY, "--epochs", 1, "--out", out)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()

    def fails(*argv, message):
        status, _, err = run(capsys, "train", *TINY, "--epochs", 2, *argv)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1

    fails("--out", out, message="exists; resume it")
    assert (out / "checkpoint.pt").read_bytes() == before  # never overwritten
    fails("--out", out, "--resume", "--peers", "mlp,cnn1d", message="of a different run: peers")
    (tmp_path / "config.json").write_text(json.dumps({"epocs": 3}))
    fails("--config", tmp_path / "config.json", message="unknown option 'epocs'")
    (tmp_path / "bad.yaml").write_text("peers: [mlp\n")
    fails("--config", tmp_path / "bad.yaml", message="cannot parse")
    (tmp_path / "file").write_text("")
    fails("--out", tmp_path / "file" / "run", message="cannot write to")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"garbage" * 100)
    fails("--out", corrupt, "--resume", message="cannot read checkpoint")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_checkpoint({"config": None}, foreign / "checkpoint.pt")
    fails("--out", foreign, "--resume", message="holds no run configuration")
    # a teacher for another number of classes (peers must agree on the classes)
    torch.save(build_model("cnn1d", (64,), 5).state_dict(), tmp_path / "t.pt")
    fails(
        "--mode",
        "distill",
        "--teacher",
        "cnn1d",
        "--teacher-checkpoint",
        tmp_path / "t.pt",
        "--out",
        tmp_path / "d",
        message="does not fit a cnn1d for 10 classes",
    )


def test_errors_exit_without_traceback_from_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "fastdml", "train", "--dataset", "imagenet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    expected = "unknown dataset 'imagenet'; choose one of mnist1d, digits, cifar10, cifar100"
    assert result.stderr == f"fastdml: error: {expected}\n"


# Runs the command in a child that SIGKILLs itself: before its KILL_AT-th training step, or in
# the middle of writing its KILL_AT-th checkpoint. No cleanup runs, as with a real crash.
KILLED = """
import os, signal, sys
import torch
import fastdml.cohort.cohort

kill_at, where, count = int(os.environ["KILL_AT"]), os.environ["KILL_WHERE"], [0]

def killer(original):
    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == kill_at:
            if where == "write":
                args[1].write(b"partial checkpoint")
                args[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped

if where == "write":
    torch.save = killer(torch.save)
else:
    fastdml.cohort.cohort.Cohort.train_step = killer(fastdml.cohort.cohort.Cohort.train_step)
from fastdml.cli.commands import main
from fastdml.models import build_model
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where, kill_at", [("step", 14), ("write", 4)])
def test_killed_run_resumes_to_the_same_parameters(tmp_path, capsys, where, kill_at):
    """8 steps an epoch, 3 epochs, a checkpoint every 3 steps and at each epoch's end: killed at
    step 14 (last checkpoint: step 12, mid-epoch) or while writing the 4th checkpoint."""
    argv = [*TINY, "--epochs", 3, "--checkpoint-every", 3, "--peers", "mlp,cnn1d"]
    argv = [str(a) for a in argv] + ["--update", "alternating", "--lr-schedule", "cosine"]
    assert run(capsys, "train", *argv, "--out", tmp_path / "whole")[0] == 0
    cut = tmp_path / "cut"
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_WHERE": where}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, "train", *argv, "--out", str(cut)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = load_checkpoint(cut / "checkpoint.pt")["trainer"]
    assert (state["epoch"], state["step"]) == ((1, 4) if where == "step" else (1, 0))
    if where == "write":
        assert any(p.name.startswith(".checkpoint.pt.tmp-") for p in cut.iterdir())
    resumed = subprocess.run(
        [sys.executable, "-m", "fastdml", "train", "--out", str(cut), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in cut.iterdir() if p.name.startswith(".")) == []
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["cohort"]["peers"]
    again = load_checkpoint(cut / "checkpoint.pt")["cohort"]["peers"]
    for a, b in zip(whole, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)

    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    assert untimed(metrics(cut)) == untimed(metrics(tmp_path / "whole"))


def test_a_teacher_trained_alongside_from_a_checkpoint(tmp_path, capsys):
    """Mutual learning with a larger teacher that starts from an earlier run's weights."""
    first = tmp_path / "first"
    assert run(capsys, "train", *TINY, "--peers", "cnn1d", "--epochs", 1, "--out", first)[0] == 0
    teacher = load_checkpoint(first / "checkpoint.pt")["cohort"]["peers"][0]
    status, out, err = run(
        capsys,
        "train",
        *TINY,
        "--peers",
        "mlp",
        "--teacher",
        "cnn1d",
        "--teacher-trainable",
        "--teacher-checkpoint",
        first / "checkpoint.pt",
        "--lr",
        "0.05,0.01",
        "--lr-schedule",
        "constant",
        "--epochs",
        1,
        "--out",
        tmp_path / "along",
    )
    assert status == 0, err
    state = load_checkpoint(tmp_path / "along" / "checkpoint.pt")["cohort"]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.01]
    moved = state["peers"][1]
    assert not all(torch.equal(teacher[k], moved[k]) for k in teacher)  # trained, not frozen
    assert "peer1" in out and "ensemble" in out


def test_peer_weights_from_a_config(tmp_path):
    from fastdml.cli.config import make_config
    from fastdml.cli.runs import build_cohort
    from fastdml.data import load_dataset

    config = make_config(
        {"peers": "mlp,mlp,mlp", "peer_weights": [[0, 1, 0], [0, 0, 1], [1, 0, 0]]}
    )
    cohort = build_cohort(config, load_dataset("digits"))
    assert cohort.criterion.peer_weights.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert len(cohort.optimizer.param_groups) == 3


CONFIG_ERRORS = [
    ({"epochs": "ten"}, "epochs must be an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"peers": 5}, "peers must name at least one architecture"),
    ({"peers": [{"hidden": 3}]}, "a mapping with 'arch'"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"lr": [0.1, -1.0]}, "lr must be a finite number >= 0"),
    ({"clip_norm": 0}, "clip_norm must be a finite number > 0"),
    ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'"),
    ({"milestones": "60"}, "milestones must be a list"),
    ({"update": "together"}, "unknown update 'together'"),
    ({"compile": "yes"}, "compile must be true or false"),
    ({"teacher": {"arch": "cnn1d", "frozen": False}, "mode": "distill"}, "frozen teacher"),
    ({"teacher": "cnn1d", "mode": "distill"}, "needs its weights"),
    ({"teacher": "vgg", "mode": "distill"}, "unknown architecture 'vgg'"),
    (
        {"mode": "distill", "teacher": {"arch": "mlp", "checkpoint": "t.pt"}, "peer_weights": []},
        "leave peer_weights out",
    ),
]


@pytest.mark.parametrize("values, message", CONFIG_ERRORS, ids=[m for _, m in CONFIG_ERRORS])
def test_config_errors(values, message):
    from fastdml.cli.config import make_config
    from fastdml.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_config(values)
