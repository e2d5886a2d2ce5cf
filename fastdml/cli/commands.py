"""The `fastdml` command: `fastdml train` trains one cohort, `fastdml compare` compares modes.

Options come from the defaults, then a YAML/JSON file (--config), then flags. A mistake the user
can fix is reported in one line with exit status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from fastdml.cli.compare import DEFAULT_MODES, compare, format_table
from fastdml.cli.config import TEACHER_KEYS, RunConfig, make_config, make_teacher, read_config_file
from fastdml.cli.runs import load_data, make_trainer, stored_config
from fastdml.distributed import launched, shutdown
from fastdml.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _list(item: Callable[[str], Any]) -> Callable[[str], Any]:
    """One value, or a comma-separated list of them (one per peer)."""

    def parse(text: str) -> Any:
        values = [None if v.strip().lower() == "none" else item(v) for v in text.split(",")]
        return values[0] if len(values) == 1 else values

    parse.__name__ = item.__name__  # argparse names the type in its error message
    return parse


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


_ints.__name__ = "comma-separated integers"


def _run_options(parser: argparse.ArgumentParser, *, train: bool) -> None:
    """The options of a run, shared by `train` and `compare`; defaults are RunConfig's."""
    d = RunConfig()
    add = parser.add_argument
    add("--config", metavar="FILE", help="a YAML or JSON file of options; flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help=f"mnist1d, digits, cifar10 or cifar100 ({d.dataset})")
    data.add_argument("--data-dir", help="the folder of a torchvision dataset (cifar)")
    data.add_argument("--train-samples", type=int, help="use only the first N training examples")
    cohort = parser.add_argument_group("cohort")
    cohort.add_argument("--peers", help="the peers' architectures, e.g. mlp,cnn1d (mlp,mlp)")
    cohort.add_argument(
        "--teacher", dest="teacher_arch", metavar="ARCH", help="a teacher network's architecture"
    )
    cohort.add_argument(
        "--teacher-checkpoint",
        metavar="PATH",
        help="the teacher's weights: a fastdml checkpoint or a state_dict",
    )
    cohort.add_argument(
        "--teacher-peer",
        type=int,
        metavar="K",
        help="which peer of a fastdml checkpoint is the teacher (0)",
    )
    if train:
        cohort.add_argument(
            "--mode",
            help="independent, dml (the paper's), dml_e (ensemble teacher), dml_logits, or "
            f"distill (from a frozen --teacher) ({d.mode})",
        )
        cohort.add_argument(
            "--teacher-trainable",
            dest="teacher_frozen",
            action="store_const",
            const=False,
            help="train the teacher alongside the peers",
        )
    loss = parser.add_argument_group("loss")
    loss.add_argument("--alpha", type=float, help=f"weight of the mimicry KL ({d.alpha})")
    loss.add_argument("--temperature", type=float, help=f"softmax temperature ({d.temperature})")
    loss.add_argument("--label-smoothing", type=float, help=f"({d.label_smoothing})")
    loss.add_argument("--update", help=f"simultaneous or alternating (Algorithm 1) ({d.update})")
    optim = parser.add_argument_group("optimizer (per-peer values: comma-separated, one per peer)")
    optim.add_argument("--optimizer", help=f"sgd, adam or adamw ({d.optimizer})")
    optim.add_argument("--lr", type=_list(float), help=f"learning rate ({d.lr})")
    optim.add_argument(
        "--momentum", type=_list(float), help=f"SGD momentum, or Adam's beta1 ({d.momentum})"
    )
    optim.add_argument("--no-nesterov", dest="nesterov", action="store_const", const=False)
    optim.add_argument("--weight-decay", type=_list(float), help=f"({d.weight_decay})")
    optim.add_argument("--clip-norm", type=_list(float), help="gradient-norm bound (none)")
    optim.add_argument(
        "--lr-schedule", type=_list(str), help=f"constant, cosine or multistep ({d.lr_schedule})"
    )
    optim.add_argument("--milestones", type=_ints, help="multistep epochs, e.g. 60,120,160")
    optim.add_argument("--gamma", type=float, help=f"multistep factor ({d.gamma})")
    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=int, help=f"({d.epochs})")
    run.add_argument("--batch-size", type=int, help=f"({d.batch_size})")
    run.add_argument("--precision", help=f"fp32, bf16 or fp16 (CUDA) ({d.precision})")
    run.add_argument("--device", help=f"cpu, cuda, cuda:1, ... ({d.device})")
    run.add_argument("--compile", action="store_const", const=True, help="torch.compile the peers")
    run.add_argument(
        "--stacked",
        action="store_const",
        const=True,
        help="run the peers (of one architecture) as one batched model",
    )
    if train:
        run.add_argument("--seed", type=int, help=f"({d.seed})")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="also checkpoint every that many steps (each epoch always)",
    )
    run.add_argument("--num-workers", type=int, help="DataLoader workers (cifar)")
    run.add_argument(
        "--tensorboard",
        action="store_const",
        const=True,
        help="also log to OUT/tensorboard (needs tensorboard)",
    )
    run.add_argument("--out", help=f"the output folder ({d.out if train else 'runs/compare'})")
    run.add_argument(
        "--resume", action="store_const", const=True, help="continue from the checkpoint in --out"
    )
    run.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=True,
        help="no progress bars",
    )
    if train:
        spread = parser.add_argument_group(
            "distributed (under torchrun: each rank trains its share of the peers; "
            "see docs/distributed.md)"
        )
        spread.add_argument(
            "--replicas",
            type=int,
            metavar="R",
            help="ranks per peer group: each peer data-parallel over R ranks (1)",
        )
        spread.add_argument(
            "--exchange-every",
            type=int,
            metavar="N",
            help="exchange logits every N steps; N > 1 is codistillation, with stale copies "
            "of the other peers (their weights broadcast every N steps) in between (1)",
        )
        spread.add_argument(
            "--timeout",
            type=float,
            metavar="SECONDS",
            help=f"how long a rank waits for the others before it fails ({d.timeout:g})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastdml",
        description="Deep Mutual Learning: train a cohort of peers, or compare training modes.",
        argument_default=argparse.SUPPRESS,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train one cohort",
        description="Train one cohort; writes checkpoint.pt, metrics.csv, metrics.jsonl and "
        "curves.png to --out.",
        argument_default=argparse.SUPPRESS,
    )
    _run_options(train, train=True)
    train.set_defaults(handler=_train)
    comp = commands.add_parser(
        "compare",
        help="compare independent training, DML and DML_e over seeds",
        description="Train the same peers in several modes over several seeds and print the "
        "mean and std of each peer's and the ensemble's test accuracy; writes results.json, "
        "compare.png and every run's logs to --out.",
        argument_default=argparse.SUPPRESS,
    )
    _run_options(comp, train=False)
    comp.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated: independent, dml, dml_e, dml_logits, distill "
        "(distill needs --teacher) (%(default)s)",
    )
    comp.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="(0,1,2)")
    comp.set_defaults(handler=_compare)
    return parser


CLI_ONLY = ("command", "handler", "config", "progress", "modes", "seeds")


def _config(
    args: argparse.Namespace, *, default_out: str, resume_from_out: bool, teacher_apart: bool
) -> tuple[RunConfig, dict[str, Any] | None]:
    """Defaults < config file < flags (on --resume: < the checkpoint's own options first).

    With `teacher_apart`, the teacher is returned on its own, not as part of the run.
    """
    flags = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    file_values = read_config_file(args.config) if "config" in args else {}
    teacher_flags = {k: flags.pop(f"teacher_{k}") for k in TEACHER_KEYS if f"teacher_{k}" in flags}
    layers = [{"out": default_out}, file_values]
    out = flags.get("out", file_values.get("out", default_out))
    resume = flags.get("resume", file_values.get("resume", False))
    if resume and resume_from_out:
        layers.insert(0, stored_config(out))
    teacher = next((layer["teacher"] for layer in reversed(layers) if layer.get("teacher")), None)
    if teacher_flags:
        teacher = {**({"arch": teacher} if isinstance(teacher, str) else teacher or {})}
        teacher.update(teacher_flags)
        if "arch" not in teacher:
            raise UserError("the teacher's options need its architecture: give --teacher ARCH")
        flags["teacher"] = teacher
    if teacher_apart:
        layers = [{k: v for k, v in layer.items() if k != "teacher"} for layer in layers]
        flags.pop("teacher", None)
    config = make_config(*layers, flags)
    return config, make_teacher(teacher) if teacher_apart and teacher else None


def _train(args: argparse.Namespace) -> int:
    config, _ = _config(args, default_out=RunConfig.out, resume_from_out=True, teacher_apart=False)
    try:
        trainer = make_trainer(config, load_data(config), progress=args.progress)
        history = trainer.run()
    finally:
        shutdown()
    if not trainer.cohort.writes_records:  # another rank of a distributed job reports
        return 0
    if history and "test_acc/ensemble" in history[-1]:
        last = history[-1]
        peers = [k for k in last if k.startswith("test_acc/peer")]
        accuracies = ", ".join(f"{k.split('/')[1]} {last[k]:.2f}" for k in peers)
        print(
            f"epoch {last['epoch']}: test accuracy (%) {accuracies}, "
            f"ensemble {last['test_acc/ensemble']:.2f}"
        )
    print(f"checkpoint and metrics in {config.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    if launched():
        raise UserError("fastdml compare runs in one process; under torchrun, use fastdml train")
    config, teacher = _config(
        args, default_out="runs/compare", resume_from_out=False, teacher_apart=True
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = compare(
        config,
        modes=modes,
        seeds=args.seeds,
        teacher=teacher,
        out=config.out,
        resume=config.resume,
        progress=args.progress,
    )
    print(format_table(results))
    print(f"results.json, compare.png and each run's logs in {config.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"fastdml: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdml: interrupted; continue with --resume", file=sys.stderr)
        return 130
