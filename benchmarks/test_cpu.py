"""Time of forward and of forward + backward of every candidate, per shape and dtype.

From the repository root (pytest-benchmark; the JSON is what `python -m benchmarks.report` reads):

    python -m pytest benchmarks/test_cpu.py --benchmark-enable \\
        --benchmark-json=benchmarks/results/cpu.json

The project's pytest configuration passes ``--benchmark-disable`` so that the test suite never times
anything; ``--benchmark-enable`` overrides it (without it every case runs once, untimed: a smoke
test). Parts: ``-k copy`` (the machine's copy bandwidth), ``-k loss`` (the shapes x dtypes
tables), ``-k sweep`` (time vs C per K, for the plot); ``-k "not sweep"`` skips the sweep.

Each candidate is checked against the float64 reference on the benchmark input (value and
gradient), then warmed up, then timed: ``forward`` under ``torch.no_grad()``, ``forward_backward``
as ``loss.backward()`` on logits that require grad (their ``.grad`` is reset, untimed, before each
round). The number of rounds is chosen from the time of one call: about SECONDS_PER_CASE seconds,
at least MIN_ROUNDS.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from benchmarks import candidates, cases

SECONDS_PER_CASE = 2.0
MIN_ROUNDS, MAX_ROUNDS = 3, 200


@functools.lru_cache(maxsize=1)
def _expected(shape, dtype):
    return candidates.reference(*cases.inputs(shape, dtype))


@functools.lru_cache(maxsize=1)
def _prepared(shape, dtype, name):
    """The candidate, checked and warmed up on the benchmark input, and its check's errors."""
    logits, target = cases.inputs(shape, dtype)
    candidate = candidates.make(name)
    errors = candidates.check(candidate, logits, target, _expected(shape, dtype))
    candidates.warm_up(candidate, logits, target)
    return candidate, errors


def _measure(benchmark, shape, dtype, name, pass_, group):
    candidate, errors = _prepared(shape, dtype, name)
    logits, target = cases.inputs(shape, dtype)
    k, n, c = shape
    benchmark.group = group
    benchmark.extra_info.update(
        K=k, N=n, C=c, dtype=dtype, candidate=name, threads=torch.get_num_threads(), **errors
    )
    benchmark.extra_info["pass"] = pass_

    if pass_ == "forward":

        def setup():
            pass

        def call():
            with torch.no_grad():
                candidate(logits, target)

    else:
        z = logits.detach().requires_grad_()

        def setup():
            z.grad = None

        def call():
            candidate(z, target).backward()

    setup()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, SECONDS_PER_CASE / seconds)))
    benchmark.pedantic(call, setup=setup, rounds=rounds)


def test_copy_bandwidth(benchmark):
    """The floor: the copy bandwidth, dst.copy_(src) of 1 GiB of float32 (read + write counted)."""
    src = torch.ones(1 << 28)
    dst = torch.empty_like(src)
    dst.copy_(src)
    benchmark.group = "copy bandwidth"
    benchmark.extra_info.update(bytes=2 * src.nbytes, threads=torch.get_num_threads())
    benchmark.pedantic(dst.copy_, args=(src,), rounds=10)


LOSS_CASES = [
    (shape, dtype, name, pass_)
    for shape in cases.SHAPES
    for dtype in cases.DTYPES
    for name in candidates.names()
    for pass_ in cases.PASSES
]


@pytest.mark.parametrize(
    ("shape", "dtype", "name", "pass_"),
    LOSS_CASES,
    ids=[f"{cases.shape_id(s)}-{d}-{n}-{p}" for s, d, n, p in LOSS_CASES],
)
def test_loss(benchmark, shape, dtype, name, pass_):
    _measure(benchmark, shape, dtype, name, pass_, group=f"{cases.shape_id(shape)} {dtype}")


SWEEP_CASES = [
    ((k, cases.SWEEP_N, c), name)
    for k in cases.SWEEP_K
    for c in cases.SWEEP_C
    for name in candidates.names()
    if name != "eager_pairs" or c <= cases.SWEEP_EAGER_MAX_C
]


@pytest.mark.parametrize(
    ("shape", "name"), SWEEP_CASES, ids=[f"{cases.shape_id(s)}-{n}" for s, n in SWEEP_CASES]
)
def test_sweep(benchmark, shape, name):
    group = f"sweep N={cases.SWEEP_N} float32 forward_backward"
    _measure(benchmark, shape, "float32", name, "forward_backward", group)
