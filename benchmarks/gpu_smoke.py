"""The GPU correctness smoke of benchmarks/gpu.sh: every fused GPU backend, mode and dtype against
the float64 reference, then determinism, CUDA graph capture, torch.compile(fullgraph=True), the
absence of host syncs, out-of-range targets and kernel launches. About a minute on an H100.

    python -m benchmarks.gpu_smoke OUT/smoke.jsonl BACKEND   (triton or cuda)

One backend a process, so that a crash of one leaves the other's results. Each check appends
one JSON line to the file as soon as it has run (a timeout keeps what ran) and prints one line;
the exit status is non-zero if any check failed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable

import torch

import fastdml

MODES = ("pairwise", "ensemble", "ensemble_logits", "weights")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (K, N, C): one tile per row, several tiles, the split path (few long rows), many peers, and
# rows enough for the CUDA op to count them first (> 2048) and to add them up apart (K * N >
# 65536, in three chunks).
SHAPES = ((3, 64, 1000), (2, 256, 8192), (4, 4, 40000), (10, 32, 300), (2, 4100, 10))
SHAPES += ((2, 40000, 20),)
# Normwise relative error allowed against float64, by logits dtype (inputs are rounded first).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}
OPTIONS = dict(temperature=2.0, alpha=0.7, label_smoothing=0.1)


def _problem(k: int, n: int, c: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = (3 * torch.randn(k, n, c, device="cuda", generator=generator)).to(dtype)
    target = torch.randint(0, c, (n,), device="cuda", generator=generator)
    target[0] = -100
    return logits, target


def _options(mode: str, k: int) -> dict:
    if mode == "weights":
        weights = torch.rand(k, k, generator=torch.Generator().manual_seed(1)).tolist()
        return dict(OPTIONS, peer_weights=weights)
    return dict(OPTIONS, mode=mode)


def _loss_and_grad(logits, target, backend: str, **options):
    z = logits.detach().requires_grad_()
    loss = fastdml.mutual_loss(z, target, backend=backend, **options)
    loss.backward()
    return loss.detach(), z.grad


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def check_accuracy(backend: str, mode: str, dtype: torch.dtype, shape) -> dict:
    k = shape[0]
    if backend == "triton" and k > 16:
        return dict(skipped="triton takes up to 16 peers")
    logits, target = _problem(*shape, dtype)
    options = _options(mode, k)
    loss, grad = _loss_and_grad(logits, target, backend, **options)
    ref_loss, ref_grad = _loss_and_grad(logits.double(), target, "torch", **options)
    again_loss, again_grad = _loss_and_grad(logits, target, backend, **options)
    result = dict(
        loss_error=_relative(loss, ref_loss),
        grad_error=_relative(grad, ref_grad),
        deterministic=bool(torch.equal(loss, again_loss) and torch.equal(grad, again_grad)),
    )
    tolerance = TOLERANCE[dtype]
    result["ok"] = (
        result["loss_error"] <= tolerance
        and result["grad_error"] <= tolerance
        and result["deterministic"]
    )
    return result


def check_float16_loss_scaling(backend: str) -> dict:
    """The fp16 recipe: the loss times 65536 (GradScaler) keeps small gradients from flushing."""
    logits, target = _problem(2, 2048, 1000, torch.float16)
    z = logits.detach().requires_grad_()
    (65536 * fastdml.mutual_loss(z, target, backend=backend)).backward()
    ref = logits.double().requires_grad_()
    (65536 * fastdml.mutual_loss(ref, target, backend="torch")).backward()
    expected = ref.grad.to(torch.float16).double()
    error = float((z.grad.double() - expected).abs().sum() / expected.abs().sum())
    flushed = int(((z.grad == 0) & (expected != 0)).sum())
    return dict(relative_l1=error, flushed=flushed, ok=error < 2e-3)


def check_graph_capture(backend: str) -> dict:
    """A training step (peers' forward, the loss, backward, SGD step) captured and replayed
    twice, each replay's loss that of the parameters before it (what the op keeps between calls,
    such as a counter, must start over at each replay)."""
    k, n, d, c = 2, 128, 64, 100
    torch.manual_seed(0)
    peers = [torch.nn.Linear(d, c).cuda() for _ in range(k)]
    params = [p for peer in peers for p in peer.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(n, d, device="cuda")
    y = torch.randint(0, c, (n,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = fastdml.mutual_loss([peer(x) for peer in peers], y, backend=backend)
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    before = [p.detach().clone() for p in params]
    errors = []
    for _ in range(2):
        with torch.no_grad():
            expected = fastdml.mutual_loss([peer(x) for peer in peers], y, backend=backend)
        graph.replay()
        torch.cuda.synchronize()
        errors.append(_relative(static_loss, expected.double()))
    moved = any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    same = max(errors) < 1e-6
    return dict(replayed=2, parameters_moved=moved, loss_errors=errors, ok=moved and same)


def check_compile(backend: str) -> dict:
    logits, target = _problem(3, 64, 1000, torch.float32)

    def loss_fn(z, y):
        return fastdml.mutual_loss(z, y, backend=backend, temperature=2.0)

    compiled = torch.compile(loss_fn, fullgraph=True)
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, graph = loss_fn(z1, target), compiled(z2, target)
    eager.backward()
    graph.backward()
    error = max(_relative(graph, eager.double()), _relative(z2.grad, z1.grad.double()))
    return dict(error=error, ok=error < 1e-6)


def check_no_sync(backend: str) -> dict:
    logits, target = _problem(2, 128, 100, torch.float32)
    _loss_and_grad(logits, target, backend)  # compiles, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loss_and_grad(logits, target, backend)
        _loss_and_grad(logits, target, backend, reduction="sum")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(ok=True)


def check_bad_target(backend: str) -> dict:
    logits, target = _problem(2, 8, 50, torch.float32)
    target[3] = 50
    target[5] = -7
    z = logits.detach().requires_grad_()
    rows = fastdml.mutual_loss(z, target, backend=backend, reduction="none")
    rows.sum().backward()
    torch.cuda.synchronize()
    bad = torch.tensor([3, 5], device="cuda")
    nan_rows = bool(rows[:, bad].isnan().all() and z.grad[:, bad].isnan().all())
    others = torch.tensor([1, 2, 4, 6, 7], device="cuda")
    finite_rows = bool(rows[:, others].isfinite().all() and z.grad[:, others].isfinite().all())
    return dict(nan_rows=nan_rows, finite_rows=finite_rows, ok=nan_rows and finite_rows)


def check_launches(backend: str) -> dict:
    logits, target = _problem(2, 128, 100, torch.float32)
    _loss_and_grad(logits, target, backend)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        _loss_and_grad(logits, target, backend)
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type.name == "CUDA"]
    return dict(launches=len(kernels), kernels=sorted(set(kernels)), ok=True)


def _record(file, name: str, check: Callable[[], dict], failures: list[str]) -> None:
    start = time.perf_counter()
    try:
        result = check()
    except Exception as error:
        result = dict(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
        result["traceback"] = traceback.format_exc()[-3000:]
    result = dict(check=name, seconds=round(time.perf_counter() - start, 2), **result)
    if not result.get("ok", True):
        failures.append(name)
    file.write(json.dumps(result) + "\n")
    file.flush()
    shown = {key: v for key, v in result.items() if key not in ("traceback", "kernels")}
    print(json.dumps(shown), flush=True)


def main(path: str, backend: str) -> int:
    print(f"{torch.cuda.get_device_name()}; backend {backend}", flush=True)
    if backend not in fastdml.available_backends():
        print(f"{backend} is not available: {fastdml.loss.backends.unavailable_reason(backend)}")
        return 1
    failures: list[str] = []
    with open(path, "a") as file:
        for name, check in (
            ("no_sync", check_no_sync),
            ("bad_target", check_bad_target),
            ("launches", check_launches),
            ("float16_loss_scaling", check_float16_loss_scaling),
            ("graph_capture", check_graph_capture),
            ("compile_fullgraph", check_compile),
        ):
            _record(file, f"{backend} {name}", lambda c=check: c(backend), failures)
        for shape in SHAPES:
            for mode in MODES:
                for dtype in DTYPES:

                    def check(m=mode, d=dtype, s=shape):
                        return check_accuracy(backend, m, d, s)

                    _record(
                        file, f"{backend} accuracy {shape} {mode} {str(dtype)[6:]}", check, failures
                    )
    print(f"{len(failures)} failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
