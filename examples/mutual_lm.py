"""Two small causal language models of different widths, trained alone and mutually.

The corpus is generated on the spot: a Markov chain over VOCAB tokens in which each token has
SUCCESSORS possible next tokens of Zipf-distributed probability (a perplexity of 6.15 at best).
The training text is short, so a model trained alone overfits it. The loss takes each model's
last hidden states and output layer (`lm_head.weight`), as for a large vocabulary, where
`fused_linear_mutual_loss` never holds the [2, tokens, VOCAB] logits whole (at this small
vocabulary a batch is a single chunk). Both runs start from the same weights and see the same
batches; only alpha differs (0: each model trained alone on its cross-entropy).

    python examples/mutual_lm.py
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from torch import nn

from fastdml import fused_linear_mutual_loss

VOCAB, CONTEXT, SUCCESSORS = 2048, 32, 8


def make_corpus(tokens: int, seed: int) -> torch.Tensor:
    """`tokens` of text drawn with `seed` from the chain, which is the same for every seed."""
    rng = random.Random(seed)
    table = random.Random(0)
    successors = [table.sample(range(VOCAB), SUCCESSORS) for _ in range(VOCAB)]
    weights = [1 / (rank + 1) for rank in range(SUCCESSORS)]
    text = [0]
    while len(text) < tokens:
        text.append(rng.choices(successors[text[-1]], weights)[0])
    return torch.tensor(text)


class CausalLM(nn.Module):
    """Token and position embeddings, pre-norm transformer blocks, a final norm, an output layer."""

    def __init__(self, width: int, layers: int, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last hidden states [batch * CONTEXT, width]; the logits are lm_head's."""
        x = self.embed(tokens) + self.position
        x = self.blocks(x, mask=self.mask, is_causal=True)
        return self.norm(x).flatten(0, 1)


def windows(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of non-overlapping windows of CONTEXT tokens."""
    count = (len(text) - 1) // CONTEXT
    inputs = text[: count * CONTEXT].view(count, CONTEXT)
    return inputs, text[1 : count * CONTEXT + 1].view(count, CONTEXT)


def train(models, alpha: float, data, steps: int, batch: int, seed: int) -> None:
    parameters = [p for model in models for p in model.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = data
    for _ in range(steps):
        rows = torch.randint(0, len(inputs), (batch,), generator=generator)
        hidden = [model(inputs[rows]) for model in models]
        weight = [model.lm_head.weight for model in models]
        loss = fused_linear_mutual_loss(hidden, weight, targets[rows].flatten(), alpha=alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def perplexities(models, data) -> list[float]:
    inputs, targets = data
    out = fused_linear_mutual_loss(
        [model(inputs) for model in models],
        [model.lm_head.weight for model in models],
        targets.flatten(),
        alpha=0.0,
        return_components=True,
    )
    return [math.exp(ce) for ce in out.ce.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-tokens", type=int, default=60000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    train_data = windows(make_corpus(args.train_tokens, seed=1))
    valid_data = windows(make_corpus(20000, seed=2))
    torch.manual_seed(args.seed)
    initial = [CausalLM(width=64, layers=2), CausalLM(width=128, layers=2)]
    print(f"validation perplexity after {args.steps} steps on {args.train_tokens} tokens")
    print(f"{'':>9} {'width 64':>9} {'width 128':>9}")
    for label, alpha in (("alone", 0.0), ("mutual", 1.0)):
        models = [CausalLM(width=64, layers=2), CausalLM(width=128, layers=2)]
        for model, init in zip(models, initial, strict=True):
            model.load_state_dict(init.state_dict())
        train(models, alpha, train_data, args.steps, args.batch, args.seed)
        row = " ".join(f"{ppl:9.2f}" for ppl in perplexities(models, valid_data))
        print(f"{label:>9} {row}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
