"""Two peers trained by a Lightning Trainer, alone and with mutual learning.

The data and the peers are those of two_peers.py: a 10-class problem of Gaussian clusters with 40%
of the training labels flipped, and two MLPs. `fastdml.lightning.MutualLearning` trains them with
Adam, each peer with its own learning rate, gradient-norm bound and cosine schedule; the Trainer
validates each peer and their ensemble after every epoch. Both runs start from the same weights
and see the same batches; only `alpha` differs (0: two independent peers).

    python examples/lightning_mutual.py
    python examples/lightning_mutual.py --alternating --bf16 --devices 2  # DDP over 2 processes
"""

from __future__ import annotations

import argparse

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset
from two_peers import make_data, make_peer

from fastdml import LRSchedule, MutualLoss
from fastdml.lightning import MutualLearning


def train(initial, alpha: float, train_set, test_set, args) -> dict[str, float]:
    """The last epoch's validation metrics of a cohort started from `initial`'s weights."""
    peers = [make_peer() for _ in initial]
    for peer, init in zip(peers, initial, strict=True):
        peer.load_state_dict(init.state_dict())
    module = MutualLearning(
        peers,
        MutualLoss(alpha=alpha),
        optimizer="adam",
        peer_options=[{"lr": 1e-3}, {"lr": 2e-3}],
        clip_norm=[1.0, 5.0],
        lr_schedule=LRSchedule("cosine", epochs=args.epochs),
        update="alternating" if args.alternating else "simultaneous",
    )
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_find_unused_parameters_true" if args.devices > 1 else "auto",
        precision="bf16-mixed" if args.bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    order = torch.Generator().manual_seed(args.seed)  # the same batches for both runs
    batches = DataLoader(TensorDataset(*train_set), batch_size=64, shuffle=True, generator=order)
    trainer.fit(module, batches, DataLoader(TensorDataset(*test_set), batch_size=1000))
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alternating", action="store_true", help="the paper's Algorithm 1")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP when > 1)")
    args = parser.parse_args()

    train_set, test_set = make_data(args.train_size, 10000, args.noise, args.seed)
    torch.manual_seed(args.seed)
    initial = [make_peer() for _ in range(2)]
    runs = [("independent (alpha=0)", 0.0), ("mutual (alpha=1)", 1.0)]
    results = [(name, train(initial, alpha, train_set, test_set, args)) for name, alpha in runs]
    if lightning.pytorch.utilities.rank_zero_only.rank == 0:
        print(f"test accuracy (%) after {args.epochs} epochs on {args.train_size} noisy examples")
        print(f"{'':>22} {'peer 0':>8} {'peer 1':>8} {'ensemble':>9}")
        for name, metrics in results:
            acc = [metrics[f"val_acc/{who}"] for who in ("peer0", "peer1", "ensemble")]
            print(f"{name:>22} {acc[0]:8.2f} {acc[1]:8.2f} {acc[2]:9.2f}")


if __name__ == "__main__":
    main()
