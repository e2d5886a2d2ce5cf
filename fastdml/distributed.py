"""Mutual learning across processes and machines with torch.distributed (launched by torchrun).

A job of W ranks is split into W / R peer groups of R replicas each, and the K peers are shared
evenly by the groups: rank r is replica r % R of group r // R. Every rank reads the same batch
(the same data order everywhere). The R replicas of a group split it into R shards and train the
group's peers on their own shard under DistributedDataParallel (gradients averaged over the
group; a batch of fewer than 2R rows is skipped); the ranks with the same replica index, one
per group, form an exchange group that all_gathers its peers' logits on that shard. Each rank
then computes the whole cohort's fused mutual loss with its own peers' logits (with gradients)
beside the others' (constants: the mimicry targets take no gradient), so its peers get exactly
their single-process gradients. Only logits cross between groups, never weights or gradients.

Codistillation (Anil et al., 2018), ``exchange_every=n > 1``: logits are exchanged only every n
steps, when the weights of every peer are also broadcast to every rank; in between a rank
evaluates these stale copies itself (in eval mode, like a teacher), and nothing crosses.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fastdml.cohort.checkpoint import describe_layout, load_checkpoint, save_checkpoint
from fastdml.cohort.cohort import PRECISIONS, Cohort, StepOutput
from fastdml.errors import CheckpointError, ConfigError, DistributedError, UserError
from fastdml.loss.mutual_loss import MutualLoss

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for the others before it gives up


def launched() -> bool:
    """Whether this process is a rank of a job started by torchrun (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` without an index is the GPU of LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_from_environment(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Joins the job torchrun started (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE): gloo on the
    CPU, NCCL on CUDA. The timeout is finite so that a rank that stops makes the others fail
    instead of wait forever. Does nothing when the process group exists already."""
    if dist.is_initialized():
        return
    if not timeout > 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with collective("start-up of the job"):
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def seed_rank(seed: int) -> None:
    """Seeds torch's generators (CPU and CUDA) from `seed` and this rank, so that the peers of
    different ranks (and replicas) draw different dropout masks. Call it after building every
    peer from `seed` (the initial weights stay those of a single process)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, dist.get_rank()]).generate_state(1)[0]))


def shutdown() -> None:
    """Leaves the job's process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turns the error of a collective whose peers vanished into one clear `DistributedError`
    (running out of memory is left as it is: it is this rank's)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # gloo and NCCL raise RuntimeError (DistError among them)
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedError(
            f"rank {rank}: the {what} failed, most likely because another rank stopped or "
            f"cannot be reached ({reason}); restart the whole job with --resume"
        ) from error


@dataclass(frozen=True)
class Placement:
    """Which rank holds which peers: `world_size` ranks in groups of `replicas`, the
    `num_peers` peers shared evenly by the groups, in order."""

    num_peers: int
    world_size: int
    replicas: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("num_peers", "world_size", "replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.world_size % self.replicas:
            raise ConfigError(
                f"the world size ({self.world_size} ranks) must be a multiple of replicas "
                f"({self.replicas})"
            )
        if self.num_peers % self.groups:
            raise ConfigError(
                f"{self.num_peers} peers cannot be shared evenly by {self.groups} peer groups "
                f"({self.world_size} ranks / {self.replicas} replicas): the number of ranks "
                f"must be replicas times a divisor of the number of peers"
            )
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def groups(self) -> int:
        return self.world_size // self.replicas

    @property
    def peers_per_group(self) -> int:
        return self.num_peers // self.groups

    @property
    def group(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    @property
    def local_peers(self) -> range:
        """The peers this rank trains."""
        return self.peers_of(self.group)

    def peers_of(self, group: int) -> range:
        return range(group * self.peers_per_group, (group + 1) * self.peers_per_group)

    def group_ranks(self, group: int) -> list[int]:
        """The replicas of a peer group (its DDP process group)."""
        return [group * self.replicas + i for i in range(self.replicas)]

    def exchange_ranks(self, replica: int) -> list[int]:
        """One rank per peer group, all working on shard `replica` of the batch."""
        return [g * self.replicas + replica for g in range(self.groups)]

    def owner(self, peer: int) -> int:
        """The rank that broadcasts and writes `peer`: replica 0 of its group."""
        return (peer // self.peers_per_group) * self.replicas


@dataclass
class Traffic:
    """Bytes this rank received from other ranks in training steps, and how many steps."""

    logits: int = 0  # the logits exchange (all_gather)
    weights: int = 0  # codistillation's broadcasts of the stale copies
    steps: int = 0

    def per_step(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"logits": self.logits / steps, "weights": self.weights / steps}

    def since(self, earlier: Traffic) -> Traffic:
        """What was counted after `earlier`, a copy of these counts taken then."""
        pairs = zip(astuple(self), astuple(earlier), strict=True)
        return Traffic(*(now - then for now, then in pairs))


class DistributedCohort(Cohort):
    """A `Cohort` spread over the ranks of a torch.distributed job (see the module's notes).

    Every rank builds every peer, from the same seed (so the initial weights are those of the
    single-process cohort), and passes them all; a rank keeps the weights of its own peers only
    (with codistillation, stale copies of the others too). Then `seed_rank` gives each rank its
    own random draws (dropout).

    Args:
        peers, criterion, options: as for `Cohort`; update must be "simultaneous".
        replicas: ranks per peer group, each peer data-parallel over that many ranks.
        exchange_every: 1 exchanges logits every step (DML exactly); n > 1 is codistillation.
        agree_on: values every rank must hold the same (e.g. the class count and the run's
            options), checked at start-up on every rank with the peers' tensor shapes.

    `traffic` counts the bytes this rank received over all its training steps (each epoch's
    record gives the bytes per step of that epoch alone).
    """

    def __init__(
        self,
        peers: Sequence[nn.Module],
        criterion: MutualLoss | None = None,
        *,
        replicas: int = 1,
        exchange_every: int = 1,
        agree_on: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if not dist.is_initialized():
            raise UserError(
                "a DistributedCohort runs in a torch.distributed job: launch it with torchrun "
                "and call fastdml.distributed.init_from_environment first"
            )
        peers = list(peers)
        world_size = dist.get_world_size()
        description = {
            "the placement (peers, ranks, replicas)": (len(peers), world_size, replicas),
            "exchange_every": exchange_every,
            **(agree_on or {}),
            **_shapes(peers),
        }
        with collective("start-up check"):  # first, so that every rank fails the same way
            _check_agreement(description)
        placement = Placement(len(peers), world_size, replicas, dist.get_rank())
        if isinstance(exchange_every, bool) or not isinstance(exchange_every, int):
            raise ConfigError(f"exchange_every must be a positive integer, got {exchange_every!r}")
        if exchange_every < 1:
            raise ConfigError(f"exchange_every must be >= 1, got {exchange_every}")
        if options.get("update", "simultaneous") != "simultaneous":
            raise ConfigError(
                "a distributed cohort updates its peers simultaneously: alternating updates "
                "would make every rank wait for the others in turn"
            )
        self.placement = placement
        self.exchange_every = exchange_every
        self.elsewhere = [k for k in range(len(peers)) if k not in placement.local_peers]
        if exchange_every == 1:  # the others' weights are never needed here
            for k in self.elsewhere:
                _release(peers[k])
        super().__init__(peers, criterion, **options)
        self.writes_records = placement.rank == 0
        self._trains = any(k in self.trainable for k in placement.local_peers)
        with collective("creation of the process groups"):
            self._peer_group, self._exchange_group = _process_groups(placement)
        if replicas > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            for k in placement.local_peers:
                if k not in self.frozen:
                    ddp = DistributedDataParallel(
                        self.peers[k], device_ids=device_ids, process_group=self._peer_group
                    )
                    self._forwards[k] = self._compiled(ddp)
        self.traffic = Traffic()  # every training step of this process, never reset
        self._recorded = Traffic()  # a copy of `traffic` at the last epoch record
        self._steps = 0  # training steps taken, which set the codistillation schedule
        self._copies_current = False  # stale copies refreshed since a resume
        self._from_copies = False  # this step's other peers come from the stale copies
        self._share = None  # this replica's share of the batch's counted rows, times replicas

    def train(self, mode: bool = True) -> DistributedCohort:
        super().train(mode)
        for k in self.elsewhere:  # stale copies (or weightless stand-ins) are teachers
            self.peers[k].eval()
        return self

    def train_step(self, x: Tensor, target: Tensor) -> StepOutput:
        """One step on this rank's shard of the batch (every rank is given the whole batch)."""
        replicas, replica = self.placement.replicas, self.placement.replica
        if replicas > 1 and len(target) < 2 * replicas:
            return self._skipped()
        if replicas > 1:
            counted = (target != self.criterion.ignore_index).sum()
            x, target = x.tensor_split(replicas)[replica], target.tensor_split(replicas)[replica]
            share = (target != self.criterion.ignore_index).sum() / counted.clamp(min=1)
            self._share = (replicas * share).to(self.device)
        exchange = self._steps % self.exchange_every == 0 or not self._copies_current
        if self.exchange_every > 1 and exchange:
            self._refresh_copies()
        self._from_copies = not exchange
        try:
            out = super().train_step(x, target)
        finally:
            self._from_copies = False
        self._steps += 1
        self.traffic.steps += 1
        return out

    def _skipped(self) -> StepOutput:
        """A batch too small to give every replica 2 rows (batch norm needs them) is skipped, the
        same way on every rank: it counts nothing and moves no peer."""
        zeros = torch.zeros(self.num_peers, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        return StepOutput(zeros, zeros, zeros.long(), count)

    def _logits(self, x: Tensor, grad: bool) -> list[Tensor]:
        mine = {k: self._forward(k, x, grad) for k in self.placement.local_peers}
        if self._from_copies:
            others = {k: self._forward(k, x, grad=False) for k in self.elsewhere}
        else:
            others = self._exchange(list(mine.values()), counted=grad)
        return [mine[k] if k in mine else others[k] for k in range(self.num_peers)]

    def _exchange(self, mine: list[Tensor], counted: bool) -> dict[int, Tensor]:
        """The other groups' peers' logits on this shard: one all_gather of [k_local, N, C],
        `counted` in the traffic of training steps (evaluation's is not)."""
        dtype = PRECISIONS[self.precision] or mine[0].dtype
        local = torch.stack([z.detach().to(dtype) for z in mine]).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.placement.groups)]
        with collective("logits exchange"):
            dist.all_gather(parts, local, group=self._exchange_group)
        if counted:
            self.traffic.logits += local.nbytes * (self.placement.groups - 1)
        logits = torch.cat(parts)
        return {k: logits[k] for k in self.elsewhere}

    def _refresh_copies(self) -> None:
        """Codistillation: every trained peer's weights from its owner to every rank (its own
        replicas too, which receive the same weights and batch-norm buffers)."""
        with torch.no_grad(), collective("weights broadcast"):
            for k in self.trainable:
                owner = self.placement.owner(k)
                for tensor in _tensors(self.peers[k]):
                    dist.broadcast(tensor, src=owner)
                    if self.placement.rank != owner:
                        self.traffic.weights += tensor.nbytes
        self._copies_current = True

    def _apply(self, loss: Tensor) -> None:
        if self._trains:  # a rank that holds only frozen teachers has nothing to step
            super()._apply(loss)

    def _backward(self, loss: Tensor) -> None:
        if self._share is None:
            super()._backward(loss)
            return
        with collective("gradient all-reduce"):  # DDP's, in the backward
            super()._backward(loss * self._share)  # DDP averages replicas: weigh each by its rows

    def epoch_record(self) -> dict[str, float]:
        """The bytes this rank received per step since the last record, by kind. `traffic`
        keeps its totals, so that it still means something after a run."""
        window = self.traffic.since(self._recorded).per_step().items()
        self._recorded = replace(self.traffic)
        return {f"received_bytes_per_step/{kind}": value for kind, value in window}

    def combine(self, sums: Tensor) -> Tensor:
        """Each peer's sums from the ranks that train it (its group's replicas, which saw the
        shards of every batch), on every rank; the others' numbers for it (computed from its
        exchanged logits or its stale copy) are left out."""
        sums = sums.clone()
        sums[:, self.elsewhere] = 0
        with collective("all-reduce of the training records"):
            dist.all_reduce(sums)
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._steps = state["steps"]
        self._copies_current = False  # refreshed at the next step

    def write_checkpoint(self, state: Mapping[str, Any], path: Path) -> None:
        """Each peer to its own file, by its owner; then rank 0 writes `path`, which names
        them with every rank's position and RNG states. Older peer files go only after that, so
        a crash at any point leaves a complete checkpoint."""
        step = state["trainer"]["global_step"]
        cohort = state["cohort"]
        with collective("checkpoint"):
            ranks = [None] * self.placement.world_size
            dist.all_gather_object(ranks, state["trainer"])
        written = list(self.placement.local_peers) if self.placement.replica == 0 else []
        for k in written:
            peer = {"peer": cohort["peers"][k], "optimizer": self._optimizer_state(cohort, k)}
            save_checkpoint(peer, _peer_path(path, k, step))
        with collective("checkpoint"):
            dist.barrier()
        if self.writes_records:
            manifest = {
                **state,
                "ranks": ranks,
                "cohort": {
                    "peer_files": [_peer_path(path, k, step).name for k in range(self.num_peers)],
                    "optimizer": {"param_groups": cohort["optimizer"]["param_groups"]},
                    "scheduler": cohort["scheduler"],
                    "scaler": cohort["scaler"],
                    "steps": cohort["steps"],
                },
                "distributed": self._layout(),
            }
            save_checkpoint(manifest, path)
        with collective("checkpoint"):
            dist.barrier()
        for k in written:
            for old in path.parent.glob(f"{path.stem}.peer{k}.step*.pt"):
                if old.name != _peer_path(path, k, step).name:
                    old.unlink(missing_ok=True)

    def _layout(self) -> dict[str, int]:
        """What a checkpoint's files depend on: resumed only by a job of the same layout."""
        placement = self.placement
        return {
            "world_size": placement.world_size,
            "replicas": placement.replicas,
            "peers": placement.num_peers,
        }

    def _optimizer_state(self, cohort: Mapping[str, Any], peer: int) -> dict[int, Any]:
        """Peer `peer`'s part of the optimizer state (keyed as in the whole state dict)."""
        if peer in self.frozen:
            return {}
        group = cohort["optimizer"]["param_groups"][self.trainable.index(peer)]
        state = cohort["optimizer"]["state"]
        return {i: state[i] for i in group["params"] if i in state}

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """This rank's view of a checkpoint that `write_checkpoint` wrote."""
        manifest = load_checkpoint(path)
        stored, here = manifest.get("distributed"), self._layout()
        if stored != here:
            written = "one process" if stored is None else describe_layout(stored)
            raise CheckpointError(
                f"{path} was written by {written}, this job is {describe_layout(here)}: "
                "resume it with the same numbers of ranks, replicas and peers"
            )
        cohort = manifest["cohort"]
        peers = [peer.state_dict() for peer in self.peers]  # loading these back changes nothing
        optimizer_state: dict[int, Any] = {}
        for k in self.placement.local_peers:
            peer = load_checkpoint(path.parent / cohort["peer_files"][k])
            peers[k] = peer["peer"]
            optimizer_state.update(peer["optimizer"])
        optimizer = {"state": optimizer_state, **cohort["optimizer"]}
        return {
            **manifest,
            "trainer": manifest["ranks"][self.placement.rank],
            "cohort": {**cohort, "peers": peers, "optimizer": optimizer},
        }


def _peer_path(path: Path, peer: int, step: int) -> Path:
    return path.with_name(f"{path.stem}.peer{peer}.step{step}.pt")


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _release(module: nn.Module) -> None:
    """Drops a peer's weights: another rank trains it; its modules stay, empty, so that every
    rank's cohort has the same structure (and its optimizer the same parameter indices)."""
    for tensor in _tensors(module):
        tensor.data = tensor.data.new_empty(0)


def _shapes(peers: Sequence[nn.Module]) -> dict[str, tuple[int, ...]]:
    return {
        f"the shape of peer {k}'s {name}": tuple(tensor.shape)
        for k, peer in enumerate(peers)
        for name, tensor in peer.state_dict().items()
    }


def _check_agreement(description: Mapping[str, Any]) -> None:
    """Raises the same `ConfigError` on every rank when any rank's description differs."""
    described: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(described, dict(description))
    first = described[0]
    for rank, other in enumerate(described[1:], start=1):
        for key in [*first, *(k for k in other if k not in first)]:
            if first.get(key) != other.get(key):
                raise ConfigError(
                    f"the ranks disagree on {key}: rank 0 has {first.get(key)!r}, rank {rank} "
                    f"has {other.get(key)!r}"
                )


def _process_groups(placement: Placement) -> tuple[Any, Any]:
    """This rank's peer group (its replicas, for DDP) and exchange group (one rank per peer
    group). Every rank creates every group, in the same order, as torch.distributed requires."""
    mine = {}
    for kind, count, ranks_of in (
        ("peers", placement.groups, placement.group_ranks),
        ("exchange", placement.replicas, placement.exchange_ranks),
    ):
        for index in range(count):
            ranks = ranks_of(index)
            group = dist.new_group(ranks)
            if placement.rank in ranks:
                mine[kind] = group
    return mine["peers"], mine["exchange"]
