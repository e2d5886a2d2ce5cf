"""Why mutual learning generalises: posterior entropy, and robustness to weight noise.

Zhang et al. (2018, Sec. 4.5) explain DML's gains by wider minima: when Gaussian noise is added to
every weight, a DML peer's training loss rises less than that of the same network trained alone,
and its posterior is less confident (higher entropy). These measure both for any classifier.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdml.data import as_loader


def posterior_entropy(model: nn.Module, data: Any, *, batch_size: int = 1024) -> float:
    """The mean entropy (nats) of the model's class posterior over `data`.

    `data` is what `fastdml.Trainer` takes: a pair of tensors (inputs, targets), a Dataset, or
    an iterable of batches whose first element is the inputs. The model is evaluated in eval
    mode and left in the mode it was in.
    """
    total, count = 0.0, 0
    for logits, _ in _predictions(model, data, batch_size):
        logp = logits.float().log_softmax(1)
        total += float(-(logp.exp() * logp).sum(1).sum(dtype=torch.float64))
        count += logp.numel() // logp.shape[1]
    return total / count


def perturbed_loss(
    model: nn.Module,
    data: Any,
    sigmas: Sequence[float],
    *,
    draws: int = 5,
    seed: int = 0,
    batch_size: int = 1024,
) -> Tensor:
    """The mean cross-entropy on `data` after adding Gaussian noise of standard deviation sigma
    to every parameter: a float64 tensor [len(sigmas), draws].

    Draw d adds ``sigma * noise_d`` with ``noise_d`` fixed by (seed, d) and the parameter
    shapes, so the curves over sigma are smooth and two models of one architecture are shaken
    by the same noise. The model's parameters are restored exactly afterwards.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite standard deviations >= 0, got {sigmas}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to perturb")
    saved = [p.detach().clone() for p in params]
    losses = torch.zeros(len(sigmas), draws, dtype=torch.float64)
    try:
        with torch.no_grad():
            for d in range(draws):
                noise = _noise(params, seed, d)
                for i, sigma in enumerate(sigmas):
                    for p, p0, n in zip(params, saved, noise, strict=True):
                        p.copy_(p0 if sigma == 0 else p0 + sigma * n)
                    losses[i, d] = _mean_loss(model, data, batch_size)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved, strict=True):
                p.copy_(p0)
    return losses


def _noise(params: Sequence[Tensor], seed: int, draw: int) -> list[Tensor]:
    state = int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(state)
    return [
        torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        for p in params
    ]


def _mean_loss(model: nn.Module, data: Any, batch_size: int) -> float:
    total, count = 0.0, 0
    for logits, target in _predictions(model, data, batch_size):
        if target is None:
            raise ValueError("the loss needs targets: give batches of (inputs, targets)")
        total += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError("the data hold no targets to compute a loss on")
    return total / count


def _predictions(
    model: nn.Module, data: Any, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(logits, targets or None) per batch, in eval mode and without gradients."""
    device = next(model.parameters(), torch.empty(0)).device
    loader = as_loader(data, batch_size=batch_size, shuffle=False, device=device)
    training = model.training
    model.eval()
    seen = False
    try:
        with torch.no_grad():
            for batch in loader:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
                seen = True
                yield (
                    model(inputs.to(device)),
                    None if target is None else target.to(device),
                )
    finally:
        model.train(training)
    if not seen:
        raise ValueError("the data hold no batches")
