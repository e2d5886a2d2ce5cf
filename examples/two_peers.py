"""Two small peers trained on synthetic data, alone and with mutual learning.

The data is a 10-class problem, each class a mixture of Gaussian clusters, with 40% of the
training labels flipped at random, so a lone peer overfits the noise. Both runs start from the same
initial weights and see the same batches; only `alpha` differs (0: two independent peers).

    python examples/two_peers.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fastdml import MutualLoss

INPUTS, CLASSES, CLUSTERS, SPREAD, HIDDEN = 32, 10, 4, 0.6, 256


def make_data(num_train: int, num_test: int, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES * CLUSTERS, INPUTS, generator=gen) / INPUTS**0.5

    def sample(n: int):
        cluster = torch.randint(0, CLASSES * CLUSTERS, (n,), generator=gen)
        x = centres[cluster] + SPREAD * torch.randn(n, INPUTS, generator=gen) / INPUTS**0.5
        return x, cluster // CLUSTERS

    (x_train, y_train), test = sample(num_train), sample(num_test)
    flip = torch.rand(num_train, generator=gen) < noise
    y_train[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=gen)
    return (x_train, y_train), test


def make_peer() -> nn.Module:
    return nn.Sequential(
        nn.Linear(INPUTS, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def train(peers, alpha: float, train_set, epochs: int, seed: int) -> None:
    criterion = MutualLoss(alpha=alpha)
    optimizer = torch.optim.Adam([p for peer in peers for p in peer.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x, y = train_set
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(64):
            loss = criterion([peer(x[batch]) for peer in peers], y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracies(peers, test_set) -> list[float]:
    x, y = test_set
    probs = [peer(x).softmax(1) for peer in peers]
    probs.append(sum(probs) / len(probs))  # the cohort's ensemble
    return [100.0 * (p.argmax(1) == y).float().mean().item() for p in probs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_set, test_set = make_data(args.train_size, 10000, args.noise, args.seed)
    torch.manual_seed(args.seed)
    initial = [make_peer() for _ in range(2)]
    print(f"test accuracy (%) after {args.epochs} epochs on {args.train_size} noisy examples")
    print(f"{'':>22} {'peer 0':>8} {'peer 1':>8} {'ensemble':>9}")
    for name, alpha in [("independent (alpha=0)", 0.0), ("mutual (alpha=1)", 1.0)]:
        peers = [make_peer() for _ in initial]
        for peer, init in zip(peers, initial, strict=True):
            peer.load_state_dict(init.state_dict())
        train(peers, alpha, train_set, args.epochs, args.seed)
        acc = accuracies(peers, test_set)
        print(f"{name:>22} {acc[0]:8.2f} {acc[1]:8.2f} {acc[2]:9.2f}")


if __name__ == "__main__":
    main()
