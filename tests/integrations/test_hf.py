"""fastdml.hf.MutualTrainer in a real transformers.Trainer, on tiny Llama models built from configs
(no download), against a hand-written loop over the materialized logits."""

import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from fastdml import FusedLinearMutualLoss, mutual_loss  # noqa: E402
from fastdml.hf import MutualTrainer  # noqa: E402

VOCAB, LENGTH, LR = 40, 10, 0.5


def tiny_llama(width, depth, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=depth,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2 * LENGTH,
    )
    return LlamaForCausalLM(config).to(dtype)


class Sequences(torch.utils.data.Dataset):
    """Random token sequences whose labels are the inputs, with the first tokens of some rows
    ignored (as a prompt would be)."""

    def __init__(self, rows, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        labels = ids.clone()
        labels[: i % 4] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def arguments(tmp_path, **changes):
    """Plain SGD at a constant rate, no clipping, no decay: a step is exactly lr * gradient."""
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**(kwargs | changes))


def batch_loss(models, data, frozen=(), **options):
    """The mutual loss of the whole dataset as one batch, on the materialized logits: the sum over
    peers and target tokens divided by the count of target tokens."""
    rows = [data[i] for i in range(len(data))]
    ids = torch.stack([row["input_ids"] for row in rows])
    labels = torch.stack([row["labels"] for row in rows])
    logits = []
    for k, model in enumerate(models):
        with torch.set_grad_enabled(k not in frozen):
            logits.append(model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB))
    target = labels[:, 1:].reshape(-1)
    count = int(target.ne(-100).sum())
    out = mutual_loss(
        logits, target, backend="torch", return_components=True, normalizer=count, **options
    )
    return out, count


def sgd_step(models, data, frozen=(), **options):
    out, _ = batch_loss(models, data, frozen, **options)
    out.loss.backward()
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                if param.grad is not None:
                    param -= LR * param.grad


def assert_same_parameters(models, expected):
    for model, other in zip(models, expected, strict=True):
        for (name, got), want in zip(model.named_parameters(), other.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def pair(seed=0):
    """Two peers of different widths and depths."""
    return [tiny_llama(16, 1, seed), tiny_llama(24, 2, seed + 1)]


@pytest.mark.parametrize(
    ("batch", "accumulation"), [pytest.param(8, 1, id="one-batch"), pytest.param(2, 4, id="ga4")]
)
def test_a_step_is_that_of_the_whole_batch(tmp_path, batch, accumulation):
    """Gradient accumulation divides by the whole accumulated batch's count of target tokens
    (num_items_in_batch), so 4 micro-batches of 2 make the step of one batch of 8."""
    data = Sequences(8)
    options = dict(temperature=2.0, alpha=0.7)
    models, expected = pair(), pair()
    args = arguments(
        tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
    )
    trainer = MutualTrainer(
        models=models, loss=FusedLinearMutualLoss(**options), args=args, train_dataset=data
    )
    trainer.train()
    sgd_step(expected, data, **options)
    assert_same_parameters(models, expected)


def test_a_frozen_teacher_and_another_divergence(tmp_path):
    """TRL's GKD setting: a frozen teacher, a student imitating it with a generalized JSD."""
    data = Sequences(8)
    options = dict(divergence="jsd", beta=0.3, peer_weights=[[0, 0], [1, 0]])
    teacher = tiny_llama(24, 2, 5)
    models = [teacher, tiny_llama(16, 1, 0)]
    expected = [tiny_llama(24, 2, 5), tiny_llama(16, 1, 0)]
    before = [param.clone() for param in teacher.parameters()]
    args = arguments(tmp_path, per_device_train_batch_size=8)
    trainer = MutualTrainer(
        models=models,
        loss=FusedLinearMutualLoss(**options),
        frozen=[0],
        args=args,
        train_dataset=data,
    )
    trainer.train()
    expected[0].requires_grad_(False)
    sgd_step(expected, data, frozen=(0,), **options)
    assert_same_parameters(models, expected)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), before, strict=True))
    assert not teacher.training


def test_evaluation_gives_each_peers_loss_and_perplexity(tmp_path):
    data = Sequences(6, seed=1)
    models = pair()
    trainer = MutualTrainer(models=models, args=arguments(tmp_path), eval_dataset=data)
    metrics = trainer.evaluate()
    with torch.no_grad():
        out, count = batch_loss(models, data)
    for k in range(2):
        assert metrics[f"eval_peer{k}_loss"] == pytest.approx(float(out.ce[k]), rel=1e-5)
        assert metrics[f"eval_peer{k}_perplexity"] == pytest.approx(
            math.exp(float(out.ce[k])), rel=1e-5
        )
        assert metrics[f"eval_peer{k}_mimicry"] == pytest.approx(float(out.mimicry[k]), rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_save_model_writes_each_peer_loadable(tmp_path):
    models = pair()
    trainer = MutualTrainer(models=models, args=arguments(tmp_path), train_dataset=Sequences(8))
    trainer.train()
    trainer.save_model()
    for k, model in enumerate(models):
        loaded = LlamaForCausalLM.from_pretrained(os.path.join(tmp_path, f"peer{k}"))
        for (name, got), want in zip(
            loaded.state_dict().items(), model.state_dict().values(), strict=True
        ):
            assert torch.equal(got, want), name


def test_resume_from_a_checkpoint(tmp_path):
    """Two steps in one run, or one step, a checkpoint and a resumed second step: the same."""
    data = Sequences(16)
    straight = pair()
    args = dict(max_steps=2, per_device_train_batch_size=8)
    MutualTrainer(
        models=straight, args=arguments(tmp_path / "a", **args), train_dataset=data
    ).train()
    first = pair()
    saving = arguments(tmp_path / "b", save_strategy="steps", save_steps=1, **args)
    trainer = MutualTrainer(models=first, args=saving, train_dataset=data)
    trainer.train()
    resumed = pair(seed=7)  # other weights: the checkpoint must replace them
    trainer = MutualTrainer(models=resumed, args=saving, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-1"))
    assert_same_parameters(resumed, straight)


def test_bf16_mixed_precision(tmp_path):
    """Under the Trainer's bf16 autocast the bodies give bfloat16 hidden states to float32
    lm_head weights; the fused loss casts them as F.linear would."""
    models = pair()
    before = [param.clone() for param in models[1].parameters()]
    trainer = MutualTrainer(
        models=models, args=arguments(tmp_path, bf16=True), train_dataset=Sequences(8)
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    changed = [not torch.equal(p, q) for p, q in zip(models[1].parameters(), before, strict=True)]
    assert all(changed) and all(p.dtype == torch.float32 for p in models[1].parameters())


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(model=None), TypeError, "models=\\[...\\], not model="),
        (dict(models=[None, None]), TypeError, "must be a transformers PreTrainedModel"),
        (dict(models="ab"), ValueError, "list of at least 2"),
        (dict(frozen=[0, 1]), ValueError, "not all of them"),
        (dict(loss=FusedLinearMutualLoss(reduction="sum")), ValueError, "reduction 'mean'"),
        (dict(loss=torch.nn.CrossEntropyLoss()), TypeError, "FusedLinearMutualLoss"),
    ],
)
def test_bad_arguments(tmp_path, change, error, message):
    kwargs = dict(models=pair(), args=arguments(tmp_path)) | change
    with pytest.raises(error, match=message):
        MutualTrainer(**kwargs)


def test_models_must_share_a_vocabulary(tmp_path):
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB + 1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    )
    with pytest.raises(ValueError, match="same vocabulary"):
        MutualTrainer(models=[pair()[0], other], args=arguments(tmp_path))


def test_label_smoothing_belongs_to_the_loss(tmp_path):
    with pytest.raises(ValueError, match="set label smoothing on the loss"):
        MutualTrainer(models=pair(), args=arguments(tmp_path, label_smoothing_factor=0.1))


@pytest.mark.slow
def test_two_data_parallel_ranks_make_the_step_of_one_batch(tmp_path):
    """Under DDP (two CPU processes, gloo) each rank's loss is divided by the count of target
    tokens of both ranks' batches, and the Trainer undoes DDP's average over ranks."""
    from test_distributed import launch

    here = Path(__file__).parent
    env = {
        "PYTHONPATH": os.pathsep.join(
            [str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]
        )
    }
    results = launch(2, [here / "hf_rank.py", tmp_path], env=env, timeout=300)
    for status, _, err, _ in results:
        assert status == 0, err[-3000:]
    expected = pair()
    sgd_step(expected, Sequences(8), temperature=2.0)
    trained = pair(seed=7)
    for model, state in zip(trained, torch.load(tmp_path / "peers.pt"), strict=True):
        model.load_state_dict(state)
    assert_same_parameters(trained, expected)
