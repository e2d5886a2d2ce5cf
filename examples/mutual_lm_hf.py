"""Two small Llama models of different widths in the Hugging Face Trainer, alone and mutually.

The corpus is generated on the spot, as in examples/mutual_lm.py: a Markov chain over VOCAB tokens
whose each token has SUCCESSORS Zipf-weighted next tokens (a perplexity of 6.15 at best). The
training text is short, so a model trained alone overfits it. `fastdml.hf.MutualTrainer` trains
both models with the fused linear mutual loss on their last hidden states and `lm_head` weights.
The two runs start from the same weights and see the same batches; only alpha differs (0: each
model alone on its cross-entropy). Needs ``pip install 'fastdml[hf]'``.

    python examples/mutual_lm_hf.py
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from mutual_lm import CONTEXT, VOCAB, make_corpus
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from fastdml import FusedLinearMutualLoss
from fastdml.hf import MutualTrainer


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of CONTEXT tokens, each its own labels (the loss shifts them)."""

    def __init__(self, text: torch.Tensor) -> None:
        self.ids = text[: len(text) // CONTEXT * CONTEXT].view(-1, CONTEXT)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def llama(width: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
    )
    return LlamaForCausalLM(config)


def run(alpha: float, train: Windows, valid: Windows, args: argparse.Namespace) -> dict:
    models = [llama(64, 2, args.seed), llama(96, 2, args.seed + 1)]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=3e-3,
            warmup_steps=args.steps // 10,
            lr_scheduler_type="cosine",
            seed=args.seed,
            report_to=[],
            save_strategy="no",
            logging_steps=args.steps,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = MutualTrainer(
            models=models,
            loss=FusedLinearMutualLoss(alpha=alpha),
            args=training,
            train_dataset=train,
            eval_dataset=valid,
        )
        trainer.train()
        return trainer.evaluate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-tokens", type=int, default=40000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = Windows(make_corpus(args.train_tokens, seed=1))
    valid = Windows(make_corpus(20000, seed=2))
    print(f"{len(train)} training windows of {CONTEXT} tokens, vocabulary {VOCAB}")
    for name, alpha in (("alone", 0.0), ("mutual", 1.0)):
        metrics = run(alpha, train, valid, args)
        perplexities = [metrics[f"eval_peer{k}_perplexity"] for k in range(2)]
        print(f"{name:>6}: validation perplexity " + ", ".join(f"{p:.2f}" for p in perplexities))


if __name__ == "__main__":
    main()
