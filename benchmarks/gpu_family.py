"""The loss family's divergences on a GPU, on logits: fastdml's two GPU ops against
torch.compile and Liger-Kernel's JSD.

    python -m benchmarks.gpu_family OUTDIR/gpu_family.jsonl

The mutual mimicry loss of distillation (``ce_weight=0``, T = 1, two peers each imitating the
other, each peer's mean over the rows, summed), forward + backward, by divergence (``kl``,
``reverse_kl``, ``jsd`` with beta 0.5), at each --shapes (K = 2 peers, N rows, C classes) and
--dtypes:

- ``fastdml_triton`` and ``fastdml_cuda``: ``fastdml.mutual_loss(logits, None, ce_weight=0,
  divergence=..., backend=...)`` (on ``--device cpu``: ``fastdml_cpp``);
- ``torch_compile``: benchmarks/loss_family.py's `plain_loss`, the definition in plain PyTorch,
  under ``torch.compile``;
- ``liger_jsd``, where liger_kernel imports: ``LigerJSD(beta)`` once per peer on the log-softmaxes,
  each peer the student of the other, detached, peer (beta 0 its forward KL, 1 its reverse KL: the
  same losses).

Every candidate's loss is first compared with fastdml's pure-PyTorch backend (``error``: the
largest relative error of the loss). Time and memory as in benchmarks/gpu_linear.py (`measure`):
CUDA events around each step after a warm-up, median of --reps, and the step's peak extra memory.
Each result is written as a JSON line as soon as it is measured, so a time limit keeps what ran.
``--device cpu`` runs the same logic at a small shape, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fastdml
from benchmarks import loss_family
from benchmarks.gpu_linear import measure, write_record

SHAPES = [(2, 8192, 32000), (2, 4096, 128256)]  # (K peers, N rows, C classes)
DTYPES = ["bfloat16", "float32"]
BETA = loss_family.BETA
LIGER_BETA = loss_family.DIVERGENCES  # the beta of Liger's JSD that is each divergence

Loss = Callable[[Tensor], Tensor]


def _liger(divergence: str) -> dict[str, Loss]:
    """Liger-Kernel's generalized JSD, where it imports, each peer the student of the other."""
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return {}
    jsd = LigerJSD(beta=LIGER_BETA[divergence])

    def liger_jsd(logits: Tensor) -> Tensor:
        log_q = F.log_softmax(logits.float(), dim=-1)
        return jsd(log_q[0], log_q[1].detach()) + jsd(log_q[1], log_q[0].detach())

    return {"liger_jsd": liger_jsd}


def candidates(divergence: str, device: str) -> dict[str, Loss]:
    options = dict(ce_weight=0.0, divergence=divergence, beta=BETA)
    backends = ("triton", "cuda") if device == "cuda" else ("cpp",)
    found: dict[str, Loss] = {
        f"fastdml_{backend}": functools.partial(
            lambda logits, backend: fastdml.mutual_loss(logits, None, backend=backend, **options),
            backend=backend,
        )
        for backend in backends
    }
    torch._dynamo.reset()  # the last case's graphs: no recompile limit is reached
    found["torch_compile"] = torch.compile(
        functools.partial(loss_family.plain_loss, divergence=divergence), dynamic=False
    )
    if device == "cuda":
        found.update(_liger(divergence))
    return found


def relative_error(loss: Loss, logits: Tensor, divergence: str) -> float:
    """The loss's largest relative error against the pure-PyTorch backend's, in float64."""
    options = dict(ce_weight=0.0, divergence=divergence, beta=BETA, backend="torch")
    expected = fastdml.mutual_loss(logits.double(), None, **options)
    return float(((loss(logits).double() - expected) / expected).abs())


def make_logits(shape: tuple[int, int, int], dtype: str, device: str) -> Tensor:
    """Logits of scale 2 (the peers differ), the same in every process."""
    generator = torch.Generator(device).manual_seed(0)
    logits = 2 * torch.randn(*shape, generator=generator, device=device)
    return logits.to(getattr(torch, dtype))


def _step(loss: Loss):
    """`loss` as benchmarks/gpu_linear.py's `measure` steps: the logits as its one hidden state."""
    return lambda hidden, weight, target: loss(hidden[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON lines file to append to")
    parser.add_argument(
        "--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES], help="K,N,C"
    )
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES + ["float16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for shape in [tuple(int(size) for size in text.split(",")) for text in args.shapes]:
            for dtype in args.dtypes:
                logits = make_logits(shape, dtype, device).requires_grad_()
                for divergence in loss_family.DIVERGENCES:
                    for candidate, loss in candidates(divergence, device).items():
                        record = {"bench": "loss_family", "device": name, "candidate": candidate}
                        record.update(divergence=divergence, shape=list(shape), dtype=dtype)
                        try:
                            record["error"] = relative_error(loss, logits.detach(), divergence)
                            record.update(measure(_step(loss), [logits], [], None, args.reps))
                        except torch.OutOfMemoryError as error:
                            record["failed"] = f"out of memory: {error}".splitlines()[0]
                        write_record(out, record)
                del logits


if __name__ == "__main__":
    main()
