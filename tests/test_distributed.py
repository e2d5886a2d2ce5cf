"""Distributed cohorts: real processes on this machine with gloo, launched as torchrun launches
them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), against single-process runs."""

import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from fastdml import MutualLoss, build_model, mutual_loss
from fastdml.cli.commands import main
from fastdml.cli.config import make_config
from fastdml.cli.runs import build_cohort, load_data, make_trainer, seed_everything
from fastdml.cohort.checkpoint import load_checkpoint, load_peer_weights
from fastdml.cohort.optim import make_optimizer
from fastdml.distributed import Placement, collective, init_from_environment
from fastdml.errors import ConfigError, DistributedError

TINY = ["--dataset", "digits", "--batch-size", "32", "--no-progress", "--epochs", "2"]
TIGHT = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding of sums taken in another order

# The command, with a fault on one rank: it SIGKILLs itself before its KILL_AT-th step, it
# loaded a dataset with FEWER_CLASSES classes, or it was given --peers PEERS.
FAULTY = """
import dataclasses, os, signal, sys
import fastdml.cli.commands
from fastdml.distributed import DistributedCohort

rank, faulty = int(os.environ["RANK"]), int(os.environ.get("FAULTY_RANK", -1))
if rank == faulty and "KILL_AT" in os.environ:
    count, step = [0], DistributedCohort.train_step

    def killed(*args, **kwargs):
        count[0] += 1
        if count[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args, **kwargs)

    DistributedCohort.train_step = killed
if rank == faulty and "FEWER_CLASSES" in os.environ:
    load = fastdml.cli.commands.load_data
    fastdml.cli.commands.load_data = lambda config: dataclasses.replace(
        load(config), num_classes=int(os.environ["FEWER_CLASSES"])
    )
extra = ["--peers", os.environ["PEERS"]] if rank == faulty and "PEERS" in os.environ else []
sys.exit(fastdml.cli.commands.main(sys.argv[1:] + extra))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks, args, *, env=None, timeout=120):
    """Runs `python args` as every rank of a job; returns each rank's (status, stdout, stderr,
    seconds). Once more on another port if the free port was taken before rank 0 listened."""
    results = launch_once(ranks, args, env, timeout)
    if "EADDRINUSE" in results[0][2]:
        results = launch_once(ranks, args, env, timeout)
    return results


def launch_once(ranks, args, env, timeout):
    port = str(free_port())
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as logs:
        children = []
        for rank in range(ranks):
            rank_env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": path,
                **(env or {}),
            }
            with open(f"{logs}/{rank}.out", "w") as out, open(f"{logs}/{rank}.err", "w") as err:
                command = [sys.executable, *map(str, args)]
                children.append(subprocess.Popen(command, env=rank_env, stdout=out, stderr=err))
        start, results = time.monotonic(), []
        try:
            for rank, child in enumerate(children):
                child.wait(timeout=max(timeout - (time.monotonic() - start), 1))
                out, err = (Path(f"{logs}/{rank}.{kind}").read_text() for kind in ("out", "err"))
                results.append((child.returncode, out, err, time.monotonic() - start))
                if "EADDRINUSE" in err:  # the others would wait for rank 0 until their timeout
                    break
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    return results


def train(*argv):
    """`fastdml train` in this process; fails the test on a non-zero status."""
    assert main(["train", *map(str, argv)]) == 0


def train_ranks(ranks, *argv, **options):
    results = launch(ranks, ["-m", "fastdml", "train", *argv], **options)
    for status, _, err, _ in results:
        assert status == 0, err
    return results


def peers(folder, count):
    return [load_peer_weights(folder / "checkpoint.pt", k) for k in range(count)]


def records(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"} for line in lines]


def learning(record):
    """A record without the bytes a rank received, which a single process does not have."""
    return {k: v for k, v in record.items() if not k.startswith("received_bytes_per_step/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run of two MLP peers and the same run on two ranks."""
    root = tmp_path_factory.mktemp("runs")
    argv = [*TINY, "--train-samples", 256, "--checkpoint-every", 3]
    train(*argv, "--out", root / "one")
    train_ranks(2, *argv, "--out", root / "two")
    return root, argv


def test_two_ranks_match_the_single_process_cohort(runs):
    root, _ = runs
    assert_close(peers(root / "two", 2), peers(root / "one", 2), **TIGHT)
    one, two = records(root / "one"), records(root / "two")
    assert [r["step"] for r in two] == [8, 16]
    for a, b in zip(one, two, strict=True):
        assert_close(learning(b), a, **TIGHT)
        assert b["received_bytes_per_step/logits"] == 32 * 10 * 4  # the other peer's [32, 10]
        assert b["received_bytes_per_step/weights"] == 0
    files = sorted(p.name for p in (root / "two").glob("checkpoint*"))
    assert files == ["checkpoint.peer0.step16.pt", "checkpoint.peer1.step16.pt", "checkpoint.pt"]


def test_a_distributed_checkpoint_resumes_only_under_torchrun(runs, capsys):
    root, _ = runs
    assert main(["train", "--out", str(root / "two"), "--resume", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"fastdml: error: {root / 'two' / 'checkpoint.pt'} was written by a distributed job of "
        "2 ranks (1 replicas a peer group) training 2 peers: resume it under torchrun, the same "
        "way\n"
    )


def test_four_ranks_match_the_single_process_cohort(tmp_path):
    """Four peers in two groups of two ranks: each rank holds two peers, each peer is
    data-parallel over two ranks (251 examples: the last batch of 27 splits 14 + 13, and each
    replica's loss is weighed by its share of the rows)."""
    argv = [*TINY, "--train-samples", 251, "--peers", "mlp,cnn1d,mlp,mlp", "--dataset", "mnist1d"]
    train(*argv, "--out", tmp_path / "one")
    train_ranks(4, *argv, "--replicas", 2, "--out", tmp_path / "four")
    assert_close(peers(tmp_path / "four", 4), peers(tmp_path / "one", 4), **TIGHT)
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "four"), strict=True):
        assert_close(learning(b), a, **TIGHT)
        # the two peers of the other group on rank 0's shards: [2, 16, 10], and [2, 14, 10] last
        assert b["received_bytes_per_step/logits"] == 2 * (7 * 16 + 14) / 8 * 10 * 4


def test_a_rank_may_hold_only_a_frozen_teacher(runs, tmp_path):
    """Distillation on two ranks: rank 1 holds only the teacher (the last peer); it sends the
    teacher's logits and steps nothing, and the job matches one process."""
    root, _ = runs
    argv = [*TINY, "--epochs", 1, "--train-samples", 96, "--peers", "mlp", "--mode", "distill"]
    argv += ["--teacher", "mlp", "--teacher-checkpoint", root / "one" / "checkpoint.pt"]
    train(*argv, "--out", tmp_path / "one")
    train_ranks(2, *argv, "--out", tmp_path / "two")
    assert_close(peers(tmp_path / "two", 2), peers(tmp_path / "one", 2), **TIGHT)
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        assert_close(learning(b), a, **TIGHT)


def test_a_killed_rank_fails_the_others_and_the_job_resumes(runs, tmp_path):
    """Rank 1 is killed before its 11th step (last checkpoint: step 9): rank 0 stops with a
    one-line error well within the timeout, and the resumed job ends as the uninterrupted one."""
    root, argv = runs
    out = tmp_path / "cut"
    env = {"FAULTY_RANK": "1", "KILL_AT": "11"}
    args = ["-c", FAULTY, "train", *argv, "--timeout", 60, "--out", out]
    (status0, _, err0, seconds0), (status1, *_) = launch(2, args, env=env)
    assert status1 == -signal.SIGKILL
    assert status0 == 2 and seconds0 < 45, err0
    assert err0.startswith("fastdml: error: rank 0: the ") and err0.count("\n") == 1, err0
    assert "another rank stopped or cannot be reached" in err0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["trainer"]["global_step"] == 9
    first, second = (rank["rng"]["torch"] for rank in checkpoint["ranks"])
    assert not torch.equal(first, second)  # each rank's own generator, restored on resume
    train_ranks(2, "--out", out, "--resume", "--no-progress")
    for a, b in zip(peers(root / "two", 2), peers(out, 2), strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)
    assert records(out) == records(root / "two")


def test_bad_settings_fail_at_start_up_on_every_rank(tmp_path):
    three = launch(3, ["-m", "fastdml", "train", *TINY, "--out", tmp_path / "three"])
    expected = "2 peers cannot be shared evenly by 3 peer groups (3 ranks / 1 replicas)"
    for status, _, err, _ in three:
        assert status == 2 and err.startswith(f"fastdml: error: {expected}"), err
    env = {"FAULTY_RANK": "1", "FEWER_CLASSES": "5"}
    two = launch(2, ["-c", FAULTY, "train", *TINY, "--out", tmp_path / "two"], env=env)
    expected = "the ranks disagree on the class count: rank 0 has 10, rank 1 has 5"
    for status, _, err, _ in two:
        assert (status, err) == (2, f"fastdml: error: {expected}\n")
    assert not (tmp_path / "two" / "checkpoint.pt").exists()
    # 3 peers on rank 1 only: its placement would fail, but the ranks compare first
    env = {"FAULTY_RANK": "1", "PEERS": "mlp,mlp,mlp"}
    odd = launch(2, ["-c", FAULTY, "train", *TINY, "--out", tmp_path / "odd"], env=env)
    expected = "the ranks disagree on the placement (peers, ranks, replicas): rank 0 has (2, 2, 1)"
    for status, _, err, _ in odd:
        assert status == 2 and err.startswith(f"fastdml: error: {expected}, rank 1 has (3"), err


def test_placement():
    placement = Placement(num_peers=4, world_size=8, replicas=2, rank=5)
    assert (placement.groups, placement.group, placement.replica) == (4, 2, 1)
    assert list(placement.local_peers) == [2]
    assert placement.group_ranks(2) == [4, 5] and placement.exchange_ranks(1) == [1, 3, 5, 7]
    assert placement.owner(3) == 6
    with pytest.raises(ConfigError, match="must be a multiple of replicas"):
        Placement(num_peers=2, world_size=3, replicas=2)
    with pytest.raises(ConfigError, match="4 peers cannot be shared evenly by 3 peer groups"):
        Placement(num_peers=4, world_size=3)


def test_distributed_options_need_a_distributed_launch():
    config = make_config({"dataset": "digits", "replicas": 2})
    with pytest.raises(ConfigError, match="launch fastdml train with torchrun"):
        build_cohort(config, load_data(config))


def test_a_dataset_read_from_disk_needs_workers_under_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = make_config({"dataset": "digits"})
    data = load_data(config)
    on_disk = dataclasses.replace(data, train=torch.utils.data.Subset(data.train, range(8)))
    with pytest.raises(ConfigError, match="needs --num-workers 1 or more"):
        build_cohort(config, on_disk)


def test_compare_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", "--no-progress"]) == 2
    assert "fastdml compare runs in one process" in capsys.readouterr().err


# Codistillation on two ranks, against the same schedule written out in one process.
STEPS, EVERY, BATCH = 7, 3, 16


def batches():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 12, generator=generator)
    return x, torch.randint(0, 5, (STEPS, BATCH), generator=generator)


def two_mlps():
    torch.manual_seed(0)
    return [build_model("mlp", (12,), 5, hidden=16) for _ in range(2)]


def codistillation_rank(out):
    """A rank of the two-rank job: trains its peer, writes its weights, traffic and the combined
    sums of the training records (cross-entropy times count, ..., count) to `out`."""
    from fastdml.distributed import DistributedCohort, init_from_environment, shutdown

    init_from_environment(torch.device("cpu"), timeout=60)
    cohort = DistributedCohort(two_mlps(), MutualLoss(), exchange_every=EVERY, device="cpu")
    sums = torch.zeros(4, 2, dtype=torch.float64)
    for x, y in zip(*batches(), strict=True):
        step = cohort.train_step(x, y)
        terms = [step.ce * step.count, step.mimicry * step.count, step.correct, step.count]
        sums += torch.stack(torch.broadcast_tensors(*terms))
    rank = cohort.placement.rank
    torch.save(
        {
            "peer": cohort.peers[rank].state_dict(),
            "traffic": vars(cohort.traffic),
            "sums": cohort.combine(sums),
        },
        Path(out) / f"rank{rank}.pt",
    )
    shutdown()


def test_codistillation_uses_stale_copies_between_exchanges(tmp_path):
    script = (
        f"from test_distributed import codistillation_rank; codistillation_rank({str(tmp_path)!r})"
    )
    for status, _, err, _ in launch(2, ["-c", script]):
        assert status == 0, err
    models = two_mlps()
    optimizer = make_optimizer("sgd", models)
    ce = torch.zeros(2, dtype=torch.float64)  # each peer's, on the rank that trains it
    for step, (x, y) in enumerate(zip(*batches(), strict=True)):
        if step % EVERY == 0:  # fresh logits, and copies of the weights for the next steps
            copies = [copy.deepcopy(m).eval() for m in models]
            others = [m(x).detach() for m in models]
        else:
            with torch.no_grad():
                others = [c(x) for c in copies]
        mine = [m(x) for m in models]
        ce += torch.stack([F.cross_entropy(z, y) for z in mine]).detach()
        first = mutual_loss([mine[0], others[1]], y, reduction="none").mean(1)[0]
        second = mutual_loss([others[0], mine[1]], y, reduction="none").mean(1)[1]
        loss = first + second
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = sum(t.nbytes for t in models[0].parameters())
    exchanges = len(range(0, STEPS, EVERY))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(result["peer"], models[rank].state_dict(), **TIGHT)
        logits = exchanges * BATCH * 5 * 4  # one peer's [16, 5] float32 logits received
        assert result["traffic"] == {"logits": logits, "weights": exchanges * weights, "steps": 7}
        assert result["sums"][3].tolist() == [STEPS * BATCH] * 2
        assert_close(result["sums"][0] / (STEPS * BATCH), ce / STEPS, **TIGHT)


def replicas_rank(out):
    """A rank of a two-rank job of one MLP on two replicas, exchanging every 2 steps: writes a
    random draw after the run is built, the peer's weights then and after steps on batches of
    16, 16, 1 (too small for two replicas: skipped) and 16 rows, the rows counted at each step
    and the traffic."""
    config = make_config(
        {
            "dataset": "digits",
            "peers": [{"arch": "mlp"}],
            "replicas": 2,
            "exchange_every": 2,
            "timeout": 60,
            "out": str(Path(out) / "run"),
        }
    )
    data = load_data(config)
    cohort = make_trainer(config, data, progress=False).cohort
    result = {"draw": torch.rand(4), "initial": copy.deepcopy(cohort.peers[0].state_dict())}
    x, y = data.train.tensors
    result["counts"] = [cohort.train_step(x[:n], y[:n]).count.item() for n in (16, 16, 1, 16)]
    result.update(peer=cohort.peers[0].state_dict(), traffic=vars(cohort.traffic))
    torch.save(result, Path(out) / f"rank{cohort.placement.rank}.pt")
    dist.destroy_process_group()


def test_replicas_skip_a_batch_too_small_to_split_and_draw_their_own_random_numbers(tmp_path):
    script = f"from test_distributed import replicas_rank; replicas_rank({str(tmp_path)!r})"
    for status, _, err, _ in launch(2, ["-c", script]):
        assert status == 0, err
    one, two = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    config = make_config({"dataset": "digits", "peers": [{"arch": "mlp"}]})
    seed_everything(config.seed)
    single = build_cohort(config, load_data(config)).peers[0].state_dict()
    assert_close(one["initial"], single, rtol=0, atol=0)
    assert_close(two["initial"], single, rtol=0, atol=0)
    assert not torch.equal(one["draw"], two["draw"])  # dropout masks would differ too
    assert one["counts"] == two["counts"] == [8, 8, 0, 8]
    assert_close(one["peer"], two["peer"], rtol=0, atol=0)  # the replicas stay in step
    assert all(tensor.isfinite().all() for tensor in one["peer"].values())
    assert not torch.equal(one["peer"]["net.1.weight"], single["net.1.weight"])
    # two exchanges (steps 0 and 2): rank 1 receives the peer's weights from rank 0
    weights = sum(tensor.nbytes for tensor in single.values())
    assert one["traffic"] == {"logits": 0, "weights": 0, "steps": 3}
    assert two["traffic"] == {"logits": 0, "weights": 2 * weights, "steps": 3}


def fit_rank(out):
    """A rank of a two-rank job of two MLPs, 2 epochs of 2 steps: writes the traffic after the
    run and the run's records."""
    options = {"dataset": "digits", "train_samples": 64, "batch_size": 32, "epochs": 2}
    config = make_config({**options, "timeout": 60, "out": str(Path(out) / "run")})
    trainer = make_trainer(config, load_data(config), progress=False)
    history = trainer.run()
    cohort = trainer.cohort
    result = {"traffic": vars(cohort.traffic), "per_step": cohort.traffic.per_step()}
    torch.save({**result, "history": history}, Path(out) / f"rank{cohort.placement.rank}.pt")
    dist.destroy_process_group()


def test_traffic_keeps_its_totals_after_a_run(tmp_path):
    """The epoch records take each epoch's bytes per step; `traffic` still counts them all."""
    script = f"from test_distributed import fit_rank; fit_rank({str(tmp_path)!r})"
    for status, _, err, _ in launch(2, ["-c", script]):
        assert status == 0, err
    logits = 32 * 10 * 4  # the other peer's [32, 10] float32 logits, every step
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["traffic"] == {"logits": 4 * logits, "weights": 0, "steps": 4}
        assert result["per_step"] == {"logits": logits, "weights": 0}
        epochs = [r["received_bytes_per_step/logits"] for r in result["history"]]
        assert epochs == [logits, logits]


def test_collective_reports_a_lost_rank_but_not_running_out_of_memory():
    with pytest.raises(torch.OutOfMemoryError), collective("logits exchange"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    lost = RuntimeError("Connection closed by peer\nmore")
    with pytest.raises(DistributedError, match=r"\(Connection closed by peer\);") as caught:
        with collective("logits exchange"):
            raise lost
    assert caught.value.__cause__ is lost


def test_init_from_environment_picks_the_gpu_of_local_rank(monkeypatch):
    calls = []
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append(backend))
    init_from_environment(torch.device("cuda"))
    assert calls == [torch.device("cuda", 1), "nccl"]
