"""GPU time, bandwidth, peak memory and kernel launches of every candidate, per shape and dtype.

Run by benchmarks/gpu.sh (skipped without a CUDA GPU):

    FASTDML_GPU_SHAPES=core FASTDML_GPU_LOG=OUT/gpu_core.jsonl \
        python -m pytest benchmarks/test_gpu.py --benchmark-enable

Each candidate is checked against the float64 reference on the benchmark input first. Times are
medians of CUDA-event timings (`triton.testing.do_bench`), stored as ``extra_info["median_ms"]``;
pytest-benchmark's own (host) statistics of the same calls, synchronized, are kept beside them.
The floor of a case is K * N * C * (bytes of a logit + bytes of a gradient) at the copy bandwidth
measured in the same run (`test_copy_bandwidth`, stored in ``extra_info["bytes_per_s"]``).
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fastdml
from benchmarks import candidates, cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAUNCH_SHAPE = (2, 128, 100)  # the target: at most 2 kernel launches for forward + backward
# The shapes that decide the GPU targets and backend="auto" (float32 and bfloat16; the largest
# vocabulary in bfloat16 only), against the baselines they are measured against.
CORE_SHAPES = [LAUNCH_SHAPE, (4, 4096, 1000), (4, 2048, 8192), (4, 8192, 32000), (2, 8192, 128256)]
CORE_CANDIDATES = ("eager_pairs", "torch_compile", "liger", "triton", "cuda")
BFLOAT16_ONLY = {(2, 8192, 128256)}
# FASTDML_GPU_SHAPES: "core" (benchmarks/gpu.sh stage c), "rest" (the other CPU shapes and
# candidates, stage d), or unset for everything.
SELECTION = os.environ.get("FASTDML_GPU_SHAPES", "all")
# FASTDML_GPU_LOG: a JSON-lines file that gets each case's results as soon as it has run (the
# pytest-benchmark JSON is written only at the end, and a time limit may come first).
LOG = os.environ.get("FASTDML_GPU_LOG")


def _log(benchmark) -> None:
    if LOG:
        with open(LOG, "a") as file:
            record = dict(group=benchmark.group, extra_info=benchmark.extra_info)
            file.write(json.dumps(record) + "\n")


def _liger() -> candidates.Candidate | None:
    """Liger-Kernel's composition: its cross-entropy per peer, its KL divergence per pair.

    Liger's cross-entropy writes its gradient into the logits it is given, in its forward: every KL
    term, which reads the peers' logits, is formed before the first cross-entropy. For the same
    reason it comes last among a case's candidates (the check before timing runs on a copy).
    """
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    cross_entropy, kl_div = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean")

    def liger(logits, target):
        k = logits.shape[0]
        log_q = [F.log_softmax(logits[i].float(), dim=1) for i in range(k)]
        q = [F.softmax(logits[j].float(), dim=1).detach() for j in range(k)]
        mimicry = sum(kl_div(log_q[i], q[j]) for i in range(k) for j in range(k) if j != i)
        return mimicry / (k - 1) + sum(cross_entropy(logits[i], target) for i in range(k))

    return liger


def _fastdml(backend: str) -> candidates.Candidate:
    def loss(logits, target):
        return fastdml.mutual_loss(logits, target, backend=backend)

    loss.__name__ = backend
    return loss


def _candidates() -> dict[str, candidates.Candidate]:
    found = {
        "eager_pairs": candidates.eager_pairs,
        "vectorized": candidates.vectorized,
        "torch_compile": None,  # made per shape: see candidates.make
        "torch": _fastdml("torch"),
    }
    for backend in ("triton", "cuda"):
        if backend in fastdml.available_backends():
            found[backend] = _fastdml(backend)
    liger = _liger()
    if liger is not None:
        found["liger"] = liger
    return found


CANDIDATES = _candidates() if torch.cuda.is_available() else {}


@functools.lru_cache(maxsize=1)
def _inputs(shape, dtype):
    logits, target = cases.inputs(shape, dtype)
    return logits.cuda(), target.cuda()


@functools.lru_cache(maxsize=1)
def _expected(shape, dtype):
    return candidates.reference(*_inputs(shape, dtype))


@functools.lru_cache(maxsize=1)
def _prepared(shape, dtype, name):
    logits, target = _inputs(shape, dtype)
    candidate = candidates.make(name) if name == "torch_compile" else CANDIDATES[name]
    errors = candidates.check(candidate, logits, target, _expected(shape, dtype))
    candidates.warm_up(candidate, logits, target)
    return candidate, errors


def _peak_extra_bytes(call) -> int:
    """Peak memory of one call above what was allocated before it (the inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _kernel_launches(call) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        torch.cuda.synchronize()
    return sum(1 for event in profile.events() if event.device_type.name == "CUDA")


def test_copy_bandwidth(benchmark):
    """The floor: dst.copy_(src) of 4 GiB of float32 (read + write counted)."""
    from triton.testing import do_bench

    src = torch.ones(1 << 30, device="cuda")
    dst = torch.empty_like(src)
    median_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    benchmark.group = "copy bandwidth"
    benchmark.extra_info.update(
        bytes=2 * src.nbytes, median_ms=median_ms, bytes_per_s=2 * src.nbytes / median_ms * 1e3
    )
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    _log(benchmark)
    benchmark.pedantic(lambda: (dst.copy_(src), torch.cuda.synchronize()), rounds=5)


def _selected(shape, dtype, name) -> bool:
    if name == "eager_pairs" and shape[1] * shape[2] > 1 << 28:
        return False  # out of memory, or minutes
    if shape in BFLOAT16_ONLY and dtype != "bfloat16":
        return False
    core = shape in CORE_SHAPES and name in CORE_CANDIDATES
    return {"core": core, "rest": not core}.get(SELECTION, True)


LOSS_CASES = [
    (shape, dtype, name, pass_)
    for shape in dict.fromkeys(CORE_SHAPES + cases.SHAPES)
    for dtype in cases.DTYPES
    for name in CANDIDATES
    for pass_ in cases.PASSES
    if _selected(shape, dtype, name)
]


@pytest.mark.parametrize(
    ("shape", "dtype", "name", "pass_"),
    LOSS_CASES,
    ids=[f"{cases.shape_id(s)}-{d}-{n}-{p}" for s, d, n, p in LOSS_CASES],
)
def test_loss(benchmark, shape, dtype, name, pass_):
    from triton.testing import do_bench

    candidate, errors = _prepared(shape, dtype, name)
    logits, target = _inputs(shape, dtype)
    z = logits.detach().requires_grad_()

    if pass_ == "forward":

        def call():
            with torch.no_grad():
                candidate(logits, target)

    else:

        def call():
            candidate(z, target).backward()

    median_ms = do_bench(call, grad_to_none=[z], return_mode="median")
    z.grad = None
    k, n, c = shape
    benchmark.group = f"{cases.shape_id(shape)} {dtype}"
    benchmark.extra_info.update(
        K=k, N=n, C=c, dtype=dtype, candidate=name, median_ms=median_ms, **errors
    )
    benchmark.extra_info["pass"] = pass_
    benchmark.extra_info["peak_extra_bytes"] = _peak_extra_bytes(call)
    z.grad = None
    if shape == LAUNCH_SHAPE:
        benchmark.extra_info["kernel_launches"] = _kernel_launches(call)
        z.grad = None
    _log(benchmark)

    def timed():
        call()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, setup=lambda: setattr(z, "grad", None), rounds=5)
