"""Mutual learning of causal language models in the Hugging Face Trainer.

`MutualTrainer` trains K causal language models together with the fused linear mutual loss: each
model's last hidden states and output embedding go to `fused_linear_mutual_loss`, so neither the
[K, N, V] logits nor an lm_head forward is ever formed. Needs ``pip install 'fastdml[hf]'``
(transformers and accelerate).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    import transformers
except ImportError as error:  # pragma: no cover - the extra is installed where this is tested
    raise ImportError(
        "fastdml.hf needs transformers and accelerate: pip install 'fastdml[hf]'"
    ) from error

from fastdml.loss import FusedLinearMutualLoss, fused_linear_mutual_loss

__all__ = ["CausalLMCohort", "MutualLMOutput", "MutualTrainer"]


@dataclasses.dataclass
class MutualLMOutput(transformers.utils.ModelOutput):
    """The mutual loss of a batch, and each peer's [K] cross-entropy and mimicry (detached),
    reduced as the loss."""

    loss: Tensor | None = None
    ce: Tensor | None = None
    mimicry: Tensor | None = None


class CausalLMCohort(nn.Module):
    """K causal language models and their fused mutual loss, as the one model a Trainer holds.

    The loss is computed in the forward, so that what the Trainer wraps around a forward (its
    autocast, data-parallel gradient hooks) covers it. Frozen peers (teachers) run without
    gradients and stay in eval mode.
    """

    # The Trainer then passes the count of target tokens of the whole accumulated (and
    # data-parallel) batch, num_items_in_batch, counted over the shifted labels labels[..., 1:].
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(
        self,
        models: Sequence[transformers.PreTrainedModel],
        loss: FusedLinearMutualLoss,
        frozen: Iterable[int] = (),
    ):
        super().__init__()
        self.peers = nn.ModuleList(models)
        self.loss = loss
        self.frozen = frozenset(frozen)
        for k in self.frozen:
            self.peers[k].requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> CausalLMCohort:
        super().train(mode)
        for k in self.frozen:
            self.peers[k].eval()
        return self

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> MutualLMOutput:
        """The loss of each peer predicting the next token: labels [B, T] (as the inputs, with
        ignore_index where nothing is predicted) shifted by one. The sum over peers and tokens is
        divided by num_items_in_batch where given, else by the batch's own count of targets."""
        if labels is None:
            raise ValueError(
                "MutualTrainer needs labels in each batch (a causal-LM collator such as "
                "DataCollatorForLanguageModeling(mlm=False) adds them)"
            )
        hidden = []
        for k, peer in enumerate(self.peers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k not in self.frozen):
                out = peer.base_model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                )
            hidden.append(
                out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
            )
        heads = [peer.get_output_embeddings() for peer in self.peers]
        biases = [head.bias for head in heads]
        options = self.loss.options
        fields = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
        if num_items_in_batch is not None:  # 0 target tokens: a loss of 0, not 0 / 0
            if isinstance(num_items_in_batch, Tensor):
                fields["normalizer"] = num_items_in_batch.clamp(min=1)
            else:
                fields["normalizer"] = max(num_items_in_batch, 1)
        loss, ce, mimicry = fused_linear_mutual_loss(
            hidden,
            [head.weight for head in heads],
            labels[:, 1:].reshape(-1),
            None if all(bias is None for bias in biases) else biases,
            chunk_size=self.loss.chunk_size,
            **(fields | {"return_components": True, "per_peer": False}),
        )
        return MutualLMOutput(loss=loss, ce=ce, mimicry=mimicry)


def _check_models(models: Sequence[nn.Module], frozen: Iterable[int]) -> tuple[int, ...]:
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError(
            f"models must be a list of at least 2 causal language models, got {models!r}"
        )
    vocab = None
    for k, model in enumerate(models):
        if not isinstance(model, transformers.PreTrainedModel):
            raise TypeError(
                f"models[{k}] must be a transformers PreTrainedModel (AutoModelForCausalLM), got "
                f"{type(model).__name__}"
            )
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"models[{k}] ({type(model).__name__}) has no linear output embedding: the fused "
                "loss needs each peer's logits to be lm_head(hidden states)"
            )
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, name, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"models[{k}] transforms its logits after the lm_head (config.{name} = "
                    f"{getattr(model.config, name)}), which the fused loss does not apply"
                )
        if vocab is not None and head.out_features != vocab:
            raise ValueError(
                "every model must have the same vocabulary: models[0] has "
                f"{vocab} output classes, models[{k}] has {head.out_features}"
            )
        vocab = head.out_features
    frozen = tuple(sorted(set(frozen)))
    if any(not 0 <= k < len(models) for k in frozen) or len(frozen) == len(models):
        raise ValueError(
            f"frozen must list some of the model indices 0..{len(models) - 1}, and not all of "
            f"them, got {frozen}"
        )
    return frozen


class MutualTrainer(transformers.Trainer):
    """A `transformers.Trainer` that trains K causal language models mutually.

    Example::

        trainer = MutualTrainer(
            models=[model_a, model_b],
            loss=FusedLinearMutualLoss(temperature=1.0, divergence="jsd", beta=0.5),
            args=TrainingArguments(output_dir="out", bf16=True, gradient_accumulation_steps=4),
            train_dataset=train, eval_dataset=valid, data_collator=collator,
        )
        trainer.train()
        trainer.save_model()  # out/peer0, out/peer1: each loadable with from_pretrained

    Args:
        models: K `AutoModelForCausalLM` models whose logits are ``lm_head(hidden states)``, with
            one vocabulary; widths and depths may differ.
        loss: the mutual loss's options, as a `FusedLinearMutualLoss` (default: the paper's DML,
            pairwise KL). Its reduction must be "mean": the loss is divided by the Trainer's count
            of target tokens in the whole accumulated, data-parallel batch (num_items_in_batch),
            as the Trainer's own causal-LM loss is.
        frozen: indices of frozen models (teachers): no gradients, never stepped, eval mode.
            With ``peer_weights`` in `loss`, the students imitate them only (TRL's GKD setting).
        kwargs: the `transformers.Trainer`'s keyword arguments (args, datasets, collator,
            processing_class, callbacks, ...), but not `model`.
    """

    def __init__(
        self,
        models: Sequence[transformers.PreTrainedModel],
        loss: FusedLinearMutualLoss | None = None,
        frozen: Iterable[int] = (),
        **kwargs: Any,
    ) -> None:
        if "model" in kwargs:
            raise TypeError("MutualTrainer takes its models as models=[...], not model=")
        frozen = _check_models(models, frozen)
        loss = FusedLinearMutualLoss() if loss is None else loss
        if not isinstance(loss, FusedLinearMutualLoss):
            raise TypeError(f"loss must be a FusedLinearMutualLoss, got {type(loss).__name__}")
        if loss.options.reduction != "mean" or loss.options.per_peer:
            raise ValueError(
                "loss must have reduction 'mean' and per_peer=False (got "
                f"{loss.options.reduction!r}, {loss.options.per_peer}): the trainer steps every "
                "model on one loss, divided by the batch's count of target tokens"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise TypeError("MutualTrainer computes its own loss: compute_loss_func must be None")
        args = kwargs.get("args")
        if args is not None and args.label_smoothing_factor != 0:
            raise ValueError(
                "set label smoothing on the loss (FusedLinearMutualLoss(label_smoothing=...)), "
                f"not in TrainingArguments (label_smoothing_factor={args.label_smoothing_factor})"
            )
        super().__init__(model=CausalLMCohort(models, loss, frozen), **kwargs)

    @property
    def peers(self) -> nn.ModuleList:
        """The K models being trained."""
        return self.model.peers

    @torch.no_grad()
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Each peer's cross-entropy per target token (``{prefix}_peer{k}_loss``), perplexity
        (``_perplexity``) and mimicry (``_mimicry``), and the mutual loss per target token
        (``{prefix}_loss``), over the evaluation set."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        self.model.eval()
        k = len(self.peers)
        ignore_index = self.model.loss.options.ignore_index
        sums = torch.zeros(2 * k + 2, dtype=torch.float64, device=self.args.device)
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            # Divided by 1: the sums over the batch's tokens, divided by the set's count below.
            out = self.model(**inputs, num_items_in_batch=1)
            tokens = inputs["labels"][:, 1:].ne(ignore_index).sum()
            sums += torch.cat([out.ce, out.mimicry, out.loss[None], tokens[None]]).double()
        sums = self.accelerator.reduce(sums, reduction="sum")
        tokens = max(float(sums[-1]), 1.0)
        metrics = {f"{metric_key_prefix}_loss": float(sums[-2]) / tokens}
        for peer in range(k):
            ce = float(sums[peer]) / tokens
            metrics[f"{metric_key_prefix}_peer{peer}_loss"] = ce
            metrics[f"{metric_key_prefix}_peer{peer}_perplexity"] = math.exp(min(ce, 700.0))
            metrics[f"{metric_key_prefix}_peer{peer}_mimicry"] = float(sums[k + peer]) / tokens
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "MutualTrainer.predict is not supported: predict or generate with each model of "
            "trainer.peers (or a Trainer of its own)"
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Each peer in its own folder, output_dir/peer{k}, loadable with from_pretrained."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if not self.args.should_save:
            return
        for k, peer in enumerate(self.peers):
            peer.save_pretrained(os.path.join(output_dir, f"peer{k}"))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        """Each peer's weights from the folders `_save` wrote."""
        for k, peer in enumerate(self.peers):
            folder = os.path.join(resume_from_checkpoint, f"peer{k}")
            if not os.path.isdir(folder):
                raise ValueError(
                    f"{resume_from_checkpoint} has no peer{k}/: not a MutualTrainer checkpoint"
                )
            saved = type(peer).from_pretrained(folder, dtype=peer.dtype)
            peer.load_state_dict(saved.state_dict())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
