"""The CUDA kernels (csrc/*.cu) run on the CPU, checked against the float64 reference.

CI has no GPU, so the .cu sources themselves run here: built by the host C++ compiler with a shim
(tests/cuda_emulation/) in which the threads of a block are fibers, __syncthreads and the warp
shuffles are exact barriers and exchanges, and every launch goes through the real launchers. The
cases reach every path the launchers pick: each mode and dtype, K = 2..10 (the fixed-K kernel for
2..8, the any-K kernel beyond and for float64), a warp or the whole block per row, vector and
scalar loads, rows that fit the shared-memory cache, fit it in part or get none, the split of few
long rows across blocks, teams that go on to further rows, ignored and out-of-range targets, the
reductions "sum" and "mean" in the forward's own launch (the rows counted by each block, or by a
kernel ahead of it for many rows; the last block to finish adds the rows up), the backward's
row scaling, and the loss family (reverse KL, JSD, ce_weight, unlabeled rows, a normalizer) on the
any-K kernel and the split. Each case also asserts the path it took (from the launches), so that
a changed threshold cannot leave a path silently untested. Every launch is held to a GPU's rules
for shared memory (static and dynamic together past 48 KiB only where the launcher opted in), and
the shapes that ask for exactly 48 KiB of dynamic shared memory are among the cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import torch
from cuda_emulation.build import build, unavailable_reason
from cuda_emulation.device import (
    H100,
    H200,
    SCHEDULES,
    DeviceInfo,
    EmulatedDevice,
    EmulationError,
    ForwardResult,
    Launch,
)
from torch import Tensor

from fastdml.loss.arguments import make_problem
from fastdml.loss.options import LossOptions
from fastdml.loss.reference import mutual_loss, mutual_loss_rows

UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.slow,  # a sweep of every path and schedule: `python -m pytest -m slow`
    pytest.mark.skipif(
        UNAVAILABLE is not None, reason=f"the CUDA emulation cannot be built: {UNAVAILABLE}"
    ),
]

MODES = ["pairwise", "ensemble", "ensemble_logits", "weights"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
IGNORE = -100
OPTIONS = {"temperature": 2.0, "alpha": 0.8, "label_smoothing": 0.1}
ROW_SCALE = 0.37  # grad_scale: what the forward multiplies its gradient by

# Tolerances against float64, measured (the largest error seen is a fifth of them or less, but
# for the rounding to float16 / bfloat16, which is at its bound) and explained. The kernels
# compute in float32 (float64 for float64 logits) from the same, already rounded, logits as the
# reference: the loss terms carry a few rounding errors of that precision, relative to their size
# (or to the entropies they are differences of, for the mimicry).
ROW_TOLERANCE = {torch.float64: (2e-14, 2e-14)} | dict.fromkeys(
    (torch.float32, torch.float16, torch.bfloat16), (5e-6, 5e-6)
)
# The gradient: the same in its precision of computation, plus its rounding to the logits dtype
# (at most half an ulp: 2^-11 relative for float16, 2^-8 for bfloat16). In float the kernels'
# exponentials are ex2.approx, which the emulator models at its bound, 2 ulp (2^-22 relative)
# on every value: p and q then carry about 2 of those each (their own and their log-sum-exp's),
# t as many, and the gradient s (p + alpha T (w q - t)) sums them: up to 2e-6 at alpha T = 1.6,
# and about 3e-6 of an entry's size with peer weights (w_k = sum_j W_kj, about 4 at K = 9).
_GRAD_COMPUTE = {torch.float64: (1e-14, 1e-14), torch.float32: (4e-6, 2e-6)}
GRAD_TOLERANCE = {
    dtype: (
        _GRAD_COMPUTE[acc][0] + (torch.finfo(dtype).eps / 2 if dtype != acc else 0.0),
        _GRAD_COMPUTE[acc][1],
    )
    for dtype, acc in [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ]
}

# Devices that are not an H100. The launchers keep the cache to half a multiprocessor's shared
# memory less 8 KiB (for static shared memory): SMALL_SMEM's holds one 16 KiB step of it,
# NO_SMEM's none. ONE_SM's grids are at most 2 blocks (1 with 7 or 8 peers; 4 for the any-K
# kernel), so that teams go on to further rows (the grid-stride loops) with a few dozen rows.
SMALL_SMEM = DeviceInfo(num_sms=132, smem_per_sm=48 * 1024, smem_per_block_optin=48 * 1024)
NO_SMEM = DeviceInfo(num_sms=132, smem_per_sm=16 * 1024, smem_per_block_optin=48 * 1024)
ONE_SM = DeviceInfo(1, H100.smem_per_sm, H100.smem_per_block_optin)
# sm_90 devices with thread-block clusters and little shared memory, so that rows of a few thousand
# classes need a cluster: SM90_SMALL's blocks cache 16 KiB each (one block a multiprocessor, with
# its static memory and the driver's reserve), SM90_MEDIUM's 40 KiB (88 KiB with 7 or 8 peers).
# Few multiprocessors, so that rows of 8192 classes or more are not split from 8 rows (4) on, and
# the clusters go on to further rows; SM90_SMALL holds two clusters of 3 or 4 CTAs at once.
SM90_SMALL = DeviceInfo(8, 48 * 1024, 48 * 1024, clusters=True)
SM90_MEDIUM = DeviceInfo(4, 96 * 1024, 96 * 1024, clusters=True)


@pytest.fixture(scope="session")
def gpu(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> EmulatedDevice:
    """The emulation library, built once into pytest's cache (keyed by all its sources)."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("cuda_emulation") if cache is not None else tmp_path_factory.mktemp("cuda")
    return EmulatedDevice(build(Path(root)))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors gain nothing from torch's thread pool, and on a 2-core machine its idle
    workers spinning between ops take the core that the (single-threaded) emulator runs on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    """A problem shape and layout, and the path the launchers must take for it.

    `vector`, `team` and `cache` are what the fixed-K kernel must use (float32, float16 and
    bfloat16 with K <= 8); float64 and K > 8 take the any-K kernel, and few long rows the split.
    """

    name: str
    peers: int
    rows: int
    classes: int
    layout: str = "contiguous"  # or "interleaved" ([R, K, C] storage), "padded", "offset"
    device: DeviceInfo = H100
    vector: bool = True
    team: str = "warp"  # a warp per row, or the whole "block"
    # The row is kept in shared memory: "all" of it, "part", "none", or all of it across a
    # thread-block "cluster" of CTAs, a chunk each.
    cache: str = "all"
    dtypes: tuple[torch.dtype, ...] = tuple(DTYPES)  # those worth the time
    options: dict[str, float] = field(default_factory=lambda: dict(OPTIONS))

    def __str__(self) -> str:
        return self.name


FIXED_K_DTYPES = (torch.float32, torch.bfloat16)  # a 4- and a 2-byte one, for the longer cases

PATHS = [
    Case("warp-vector", 3, 12, 72),
    Case("warp-vector-interleaved", 4, 10, 48, layout="interleaved"),
    Case("warp-scalar-odd-classes", 2, 10, 37, vector=False),
    Case("warp-scalar-padded-rows", 7, 9, 64, layout="padded", vector=False),
    Case("warp-scalar-misaligned", 5, 9, 64, layout="offset", vector=False),
    Case("block-vector", 3, 3, 2304, team="block"),
    Case("block-vector-8-peers", 8, 2, 2080, team="block"),
    Case("block-scalar", 6, 3, 1001, vector=False, team="block"),
    Case("cache-part-warp", 4, 10, 512, device=SMALL_SMEM, cache="part"),
    Case("cache-part-block", 2, 2, 6144, device=SMALL_SMEM, team="block", cache="part"),
    Case("cache-none", 4, 10, 512, device=NO_SMEM, cache="none"),
    Case("any-k-long-rows", 9, 3, 3000),
    Case("split", 3, 3, 12289),
    Case("split-10-peers", 10, 2, 8192),
    # 264 rows for 32 blocks of 8 warps; 40 rows for 32 blocks; 20 rows for 8 blocks.
    Case("grid-stride-warp", 6, 264, 24, device=ONE_SM, dtypes=FIXED_K_DTYPES),
    Case("grid-stride-block", 5, 40, 2304, device=ONE_SM, team="block", dtypes=FIXED_K_DTYPES),
    Case("grid-stride-any-k", 9, 20, 40, device=ONE_SM, dtypes=(torch.float32, torch.float64)),
    # Clusters of 3 CTAs (float32) or 2 (2-byte dtypes); of 5 or 3 (uneven chunks of a row, some
    # shorter than a block); of 2 with 5 peers and of 4 or 2 with 8 (the row values in shared
    # memory); and a row too long for 8 CTAs (12), which goes without a cluster.
    Case("cluster", 2, 6, 6144, device=SM90_SMALL, team="block", cache="cluster"),
    Case("cluster-uneven", 3, 5, 5000, device=SM90_SMALL, team="block", cache="cluster"),
    Case(
        "cluster-5-peers",
        5,
        4,
        4096,
        device=SM90_MEDIUM,
        team="block",
        cache="cluster",
        dtypes=(torch.float32,),
    ),
    Case("cluster-8-peers", 8, 4, 8192, device=SM90_MEDIUM, team="block", cache="cluster"),
    Case(
        "cluster-too-long",
        2,
        8,
        24576,
        device=SM90_SMALL,
        team="block",
        cache="part",
        dtypes=(torch.float32,),
    ),
]
PATH_CASES = {case.name: case for case in PATHS}


def split_expected(case: Case) -> bool:
    """The launchers split the classes of rows fewer than the multiprocessors, of >= 2 * 4096."""
    return case.rows < case.device.num_sms and case.classes >= 2 * 4096


def make_logits(case: Case, dtype: torch.dtype) -> Tensor:
    """Logits [K, R, C] of `dtype` laid out as the case says, unit class stride."""
    k, r, c = case.peers, case.rows, case.classes

    def values(*shape: int) -> Tensor:
        return (3 * torch.randn(*shape)).to(dtype)

    if case.layout == "contiguous":
        return values(k, r, c)
    if case.layout == "interleaved":  # peer stride C, row stride K * C
        return values(r, k, c).transpose(0, 1)
    if case.layout == "padded":  # odd row stride: rows not aligned for vectors
        return values(k, r, c + 1)[..., :c]
    if case.layout == "offset":  # the first element one element past an aligned address
        return values(k * r * c + 1)[1:].view(k, r, c)
    raise ValueError(case.layout)


def make_target(case: Case) -> Tensor:
    """Random classes, but first the last class, an ignored row, out-of-range targets (above and
    below) and class 0. The interleaved case reads every other element (target stride 2)."""
    r, c = case.rows, case.classes
    stride = 2 if case.layout == "interleaved" else 1
    target = torch.randint(0, c, (r * stride,))[::stride]
    pattern = [c - 1, IGNORE, c, 0, -1]
    target[: min(r, len(pattern))] = torch.tensor(pattern[:r])
    return target


def make_inputs(case: Case, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, target and peer weights: non-negative, with zeros, and a diagonal that counts for
    nothing (KL(q_k || q_k) = 0)."""
    weights = torch.rand(case.peers, case.peers, dtype=torch.float64)
    weights = torch.where(weights < 0.2, 0.0, weights)
    return make_logits(case, dtype), make_target(case), weights


def make_row_scale(peers: int, rows: int, dtype: torch.dtype) -> Tensor:
    """One scale per peer and row, [K, R] with strides (1, K), one of them 0 (no gradient)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_scale = (0.1 + torch.rand(rows, peers, dtype=acc)).t()
    row_scale[-1, 0] = 0
    return row_scale


def reference(
    logits: Tensor,
    target: Tensor,
    weights: Tensor,
    mode: str,
    options: dict[str, float],
    row_scale: float | Tensor = ROW_SCALE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss, ce, mimicry [K, R] and the gradient of sum(row_scale * loss) [K, R, C] in float64,
    NaN in the rows of out-of-range targets (which the GPU kernels flag instead of checking)."""
    classes = logits.shape[2]
    invalid = (target != IGNORE) & ((target < 0) | (target >= classes))
    z = logits.detach().to(torch.float64).requires_grad_()
    problem = make_problem(
        z,
        torch.where(invalid, IGNORE, target),
        LossOptions(
            temperature=options["temperature"],
            alpha=options["alpha"],
            mode="pairwise" if mode == "weights" else mode,
            peer_weights=weights if mode == "weights" else None,
            label_smoothing=options["label_smoothing"],
            ignore_index=IGNORE,
        ),
    )
    ce, mimicry = mutual_loss_rows(problem)
    loss = ce + options["alpha"] * options["temperature"] ** 2 * mimicry
    (grad,) = torch.autograd.grad(loss.sum(), z)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    rows = [torch.where(invalid, nan, x.detach()) for x in (loss, ce, mimicry)]
    scale = torch.as_tensor(row_scale, dtype=torch.float64)
    return (*rows, torch.where(invalid[:, None], nan, scale[..., None] * grad))


def run_forward(
    gpu: EmulatedDevice,
    inputs: tuple[Tensor, Tensor, Tensor],
    mode: str,
    options: dict[str, float] = OPTIONS,
    row_scale: float | Tensor = ROW_SCALE,
    **kwargs,
) -> ForwardResult:
    logits, target, weights = inputs
    return gpu.mutual_loss(
        logits,
        target,
        weights,
        row_scale=row_scale,
        mode=mode,
        ignore_index=IGNORE,
        **options,
        **kwargs,
    )


def assert_terms_close(got: ForwardResult, want: list[Tensor], rtol: float, atol: float) -> None:
    """The loss, cross-entropy and mimicry against their float64 values, NaN where those are."""
    for name, value, expected in zip(
        ("loss", "ce", "mimicry"), (got.loss, got.ce, got.mimicry), want, strict=True
    ):
        torch.testing.assert_close(
            value.double(),
            expected,
            rtol=rtol,
            atol=atol,
            equal_nan=True,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def assert_matches_reference(
    got: ForwardResult,
    inputs: tuple[Tensor, Tensor, Tensor],
    mode: str,
    options: dict[str, float] = OPTIONS,
    row_scale: float | Tensor = ROW_SCALE,
    reduction: str = "none",
) -> None:
    dtype, target = inputs[0].dtype, inputs[1]
    # "mean" weighs every row by 1 / (rows whose target is not ignored), its gradient too.
    factor = 1.0 / max(int((target != IGNORE).sum()), 1) if reduction == "mean" else 1.0
    *rows, grad = reference(*inputs, mode, options, row_scale * factor)
    rtol, atol = ROW_TOLERANCE[dtype]
    if reduction == "none":
        assert_terms_close(got, rows, rtol, atol)
    else:
        assert_reduced(got, rows[1:], factor, options, rtol, atol)
    if got.grad is not None:
        rtol, atol = GRAD_TOLERANCE[dtype]
        torch.testing.assert_close(
            got.grad.double(),
            grad,
            rtol=rtol,
            atol=atol,
            equal_nan=True,
            msg=lambda m: f"grad: {m}",
        )


def assert_reduced(
    got: ForwardResult,
    rows: list[Tensor],
    factor: float,
    options: dict[str, float],
    rtol: float,
    atol: float,
) -> None:
    """Each peer's cross-entropy and mimicry are its rows' (float64, [K, R]) summed times
    factor, and the loss is theirs summed over peers, each within the rows' tolerances summed
    (NaN where a row is NaN)."""
    weight = options["alpha"] * options["temperature"] ** 2
    want, bound = [], []
    for name, value, terms in zip(("ce", "mimicry"), (got.ce, got.mimicry), rows, strict=True):
        want.append(terms.sum(-1) * factor)
        bound.append(factor * (terms.shape[-1] * atol + rtol * terms.abs().sum(-1)))
        assert_within(name, value, want[-1], bound[-1])
    loss = (want[0] + weight * want[1]).sum()
    assert_within("loss", got.loss, loss, (bound[0] + weight * bound[1]).sum())


def assert_within(name: str, got: Tensor, want: Tensor, bound: Tensor) -> None:
    got = got.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: {got} (want {want})"
    error = (got - want).abs().nan_to_num(0.0)
    assert (error <= bound.nan_to_num(0.0)).all(), f"{name}: {got}, want {want} within {bound}"


def warp_team_barriers(launch: Launch, case: Case, reduction: str) -> int:
    """The block barriers of the fixed-K kernel with a warp per row: once a block after the peer
    weights, for "mean" once more to count the rows, and for a reduced loss three times at the end
    (the teams' sums, then twice around the ticket); the last block once more at the peers' sums."""
    per_block, last = 1, 0
    if reduction == "mean":
        per_block += 1
    if reduction != "none":
        per_block, last = per_block + 3, 1
    return launch.blocks * per_block + last


def assert_path(
    launches: list[Launch], case: Case, dtype: torch.dtype, reduction: str = "none"
) -> None:
    """The launches took the path the case is there to cover: the forward's one kernel (three for
    the split), whatever the reduction."""
    if split_expected(case):
        assert len(launches) == 3, f"expected the split (3 launches), got {launches}"
        assert launches[0].blocks > case.rows, "the split gives a row several blocks"
        return
    assert len(launches) == 1, launches
    (launch,) = launches
    args = launch.template_args
    if dtype == torch.float64 or case.peers > 8:
        assert "KT" not in args, f"expected the any-K kernel, got {launch.where}"
        return
    assert args.get("KT") == str(case.peers), f"expected the fixed-K kernel, got {launch.where}"
    vec = int(args["VEC"])
    assert (vec > 1) == case.vector, f"expected vector loads: {case.vector}, got VEC = {vec}"
    # A block per row synchronizes the block at every reduction of a row.
    team = (
        "warp" if launch.block_barriers == warp_team_barriers(launch, case, reduction) else "block"
    )
    assert team == case.team, f"expected a {case.team} per row, got {launch}"
    teams = 256 // 32 if team == "warp" else 1
    row_bytes = teams * case.peers * case.classes * torch.finfo(dtype).bits // 8
    if launch.cluster > 1:
        cache = "cluster"
        assert launch.blocks % launch.cluster == 0 and launch.cluster_barriers > 0, launch
    elif launch.dynamic_shared == 0:
        cache = "none"
    else:
        cache = "all" if launch.dynamic_shared >= row_bytes else "part"
    assert cache == case.cache, f"expected cache {case.cache}, got {launch.dynamic_shared} bytes"


# ---------------------------------------------------------------------------------------------
# The forward.


@pytest.mark.parametrize("peers", range(2, 11))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_modes_dtypes_peers(gpu: EmulatedDevice, mode: str, dtype: torch.dtype, peers: int):
    """Every mode, dtype and number of peers on short rows (a warp per row, or the any-K kernel)."""
    case = Case(f"{peers}-peers", peers, 10, 72)
    inputs = make_inputs(case, dtype)
    got = run_forward(gpu, inputs, mode)
    assert_path(got.launches, case, dtype)
    assert_matches_reference(got, inputs, mode)


@pytest.mark.parametrize(
    ("case", "dtype"),
    [pytest.param(case, dtype, id=f"{case}-{dtype}") for case in PATHS for dtype in case.dtypes],
)
@pytest.mark.parametrize("mode", MODES)
def test_paths(gpu: EmulatedDevice, mode: str, case: Case, dtype: torch.dtype):
    """Each path of the launchers: team, loads, shared-memory cache, any-K kernel, split, and
    teams that go on to further rows."""
    inputs = make_inputs(case, dtype)
    got = run_forward(gpu, inputs, mode, device=case.device)
    assert_path(got.launches, case, dtype)
    assert_matches_reference(got, inputs, mode)


OPTION_SETS = [
    pytest.param({"temperature": 1.0, "alpha": 0.5, "label_smoothing": 0.0}, id="T1-no-smoothing"),
    pytest.param({"temperature": 4.0, "alpha": 0.0, "label_smoothing": 0.3}, id="T4-alpha0"),
    pytest.param({"temperature": 0.5, "alpha": 2.0, "label_smoothing": 1.0}, id="T0.5-smoothing1"),
]


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("peers", [3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_options(
    gpu: EmulatedDevice, mode: str, dtype: torch.dtype, peers: int, options: dict[str, float]
):
    """T = 1 (one log-sum-exp per peer, p = q), no label smoothing, no mimicry, sharp targets."""
    inputs = make_inputs(Case(f"{peers}-peers", peers, 10, 72), dtype)
    got = run_forward(gpu, inputs, mode, options)
    assert_matches_reference(got, inputs, mode, options)


SPECIAL_CASES = [  # 6 rows: the targets of make_target, and row 5 with a random one
    Case("warp", 3, 6, 40),
    Case("block", 3, 6, 2304, team="block"),
    Case("any-k", 9, 6, 40),
    Case("cluster", 3, 6, 6144, device=SM90_SMALL, team="block", cache="cluster"),
    Case("split", 3, 6, 8192),
]


@pytest.mark.parametrize("case", SPECIAL_CASES, ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_masked_and_nan_logits(
    gpu: EmulatedDevice, mode: str, dtype: torch.dtype, smoothing: float, case: Case
):
    """-inf logits (masked classes: q = 0 there, and an infinite loss with label smoothing) and a
    NaN logit (it reaches that row's loss terms, never masked to a number)."""
    inputs = make_inputs(case, dtype)
    logits = inputs[0]
    logits[:, 0, 5:9] = float("-inf")  # every peer (the target, C - 1, stays finite)
    logits[1, 3, 7] = float("-inf")  # one peer only
    logits[2, 5, 11] = float("nan")
    options = OPTIONS | {"label_smoothing": smoothing}
    got = run_forward(gpu, inputs, mode, options, device=case.device)
    assert_path(got.launches, case, dtype)
    assert_matches_reference(got, inputs, mode, options)


SCHEDULED = ["warp-scalar-padded-rows", "block-vector-8-peers", "cache-part-block", "split"]
SCHEDULED += ["any-k-long-rows", "grid-stride-warp", "grid-stride-block", "grid-stride-any-k"]
SCHEDULED += ["cluster-uneven", "cluster-8-peers"]


@pytest.mark.parametrize("name", SCHEDULED)
@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_schedule_independent(gpu: EmulatedDevice, schedule: str, name: str):
    """Results are bit for bit the same whatever order a block's threads run in between barriers:
    no missing barrier, no race on shared memory, a fixed reduction order."""
    case = PATH_CASES[name]
    inputs = make_inputs(case, torch.float32)
    first, second = (
        run_forward(gpu, inputs, "ensemble_logits", device=case.device, schedule=order)
        for order in ("forward", schedule)
    )
    for a, b in zip(
        (first.loss, first.ce, first.mimicry, first.grad),
        (second.loss, second.ce, second.mimicry, second.grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "name", ["warp-vector", "block-vector", "any-k-long-rows", "split", "cluster"]
)
def test_without_grad(gpu: EmulatedDevice, name: str):
    """compute_grad = False: the same loss terms, and no gradient written (the driver hands the
    kernels a null gradient pointer, and checks that nothing was written around any buffer)."""
    case = PATH_CASES[name]
    inputs = make_inputs(case, torch.float32)
    got = run_forward(gpu, inputs, "pairwise", device=case.device, compute_grad=False)
    assert got.grad is None
    assert_matches_reference(got, inputs, "pairwise")


@pytest.mark.parametrize(
    "name", ["warp-vector", "block-vector-8-peers", "any-k-long-rows", "split", "cluster-8-peers"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_row_scale_per_row(gpu: EmulatedDevice, dtype: torch.dtype, name: str):
    """A scale per peer and row (strided; a 0 gives no gradient): the forward writes each row's
    gradient times its own scale."""
    case = PATH_CASES[name]
    inputs = make_inputs(case, dtype)
    row_scale = make_row_scale(case.peers, case.rows, dtype)
    got = run_forward(gpu, inputs, "ensemble_logits", row_scale=row_scale, device=case.device)
    assert_path(got.launches, case, dtype)
    assert_matches_reference(got, inputs, "ensemble_logits", row_scale=row_scale)


# ---------------------------------------------------------------------------------------------
# Reductions "sum" and "mean", in the forward's own launch.

REDUCED = ["warp-vector", "block-vector", "cache-part-block", "any-k-long-rows", "split"]
REDUCED += ["grid-stride-warp", "grid-stride-block", "grid-stride-any-k", "cluster-uneven"]


def in_range(inputs: tuple[Tensor, Tensor, Tensor], classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """make_inputs' with the out-of-range targets moved into range (the ignored row stays)."""
    logits, target, weights = inputs
    invalid = (target != IGNORE) & ((target < 0) | (target >= classes))
    return logits, torch.where(invalid, classes // 2, target), weights


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["pairwise", "weights"])
@pytest.mark.parametrize("name", REDUCED)
def test_reductions(gpu: EmulatedDevice, name: str, mode: str, reduction: str):
    """Each peer's cross-entropy and mimicry summed (or averaged over the rows not ignored) and
    the loss, by the last block to finish, whatever the grid; the gradient is that loss's times
    grad_scale (the mean's 1 / rows folded in)."""
    case = PATH_CASES[name]
    dtype = case.dtypes[0]
    inputs = in_range(make_inputs(case, dtype), case.classes)
    got = run_forward(gpu, inputs, mode, device=case.device, reduction=reduction)
    assert_path(got.launches, case, dtype, reduction)
    assert_matches_reference(got, inputs, mode, reduction=reduction)


@pytest.mark.parametrize("name", ["warp-vector", "any-k-long-rows", "split"])
def test_reduced_without_grad_or_scale(gpu: EmulatedDevice, name: str):
    case = PATH_CASES[name]
    inputs = in_range(make_inputs(case, torch.float32), case.classes)
    got = run_forward(
        gpu, inputs, "ensemble", row_scale=None, reduction="mean", compute_grad=False,
        device=case.device,
    )  # fmt: skip
    assert got.grad is None
    assert_matches_reference(got, inputs, "ensemble", row_scale=1.0, reduction="mean")


@pytest.mark.parametrize("name", ["warp-vector", "block-vector", "any-k-long-rows", "split"])
def test_reduced_loss_is_nan_with_a_target_out_of_range(gpu: EmulatedDevice, name: str):
    """The kernels flag such a row with NaN (no host check): every sum over it is NaN."""
    case = PATH_CASES[name]
    inputs = make_inputs(case, torch.float32)
    got = run_forward(gpu, inputs, "pairwise", device=case.device, reduction="mean")
    assert got.loss.isnan() and got.ce.isnan().all()
    assert_matches_reference(got, inputs, "pairwise", reduction="mean")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", ["warp-vector", "any-k-long-rows", "split"])
def test_every_row_ignored(gpu: EmulatedDevice, name: str, reduction: str):
    """Nothing counted: a loss of 0 and no gradient (not 0 / 0)."""
    case = PATH_CASES[name]
    logits, target, weights = make_inputs(case, torch.float32)
    got = run_forward(
        gpu, (logits, torch.full_like(target, IGNORE), weights), "pairwise", device=case.device,
        reduction=reduction,
    )  # fmt: skip
    assert got.loss == 0 and not got.ce.any() and not got.mimicry.any() and not got.grad.any()


@pytest.mark.parametrize("rows", [2048, 2049, 20000])
def test_mean_over_many_rows_is_one_launch(gpu: EmulatedDevice, rows: int):
    """Each block counts the rows of a "mean" itself: no kernel runs ahead of the forward."""
    case = Case("many-rows", 2, rows, 8)
    inputs = in_range(make_inputs(case, torch.float32), case.classes)
    got = run_forward(gpu, inputs, "pairwise", reduction="mean")
    assert_path(got.launches, case, torch.float32, "mean")
    assert_matches_reference(got, inputs, "pairwise", reduction="mean")


LARGE_REDUCED = [  # many peer rows, on one multiprocessor's blocks (grid-stride loops)
    Case("reduce-many-rows", 8, 8193, 8, device=ONE_SM),
    Case("reduce-many-rows-any-k", 9, 4099, 8, device=ONE_SM, team="block"),
]


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", LARGE_REDUCED, ids=str)
def test_large_reduced_loss_is_one_launch(
    gpu: EmulatedDevice, case: Case, reduction: str, schedule: str
):
    """The forward's last block adds the blocks' sums, whichever block that is (the reverse
    schedule runs the blocks last first), and leaves the ticket zero (the driver checks)."""
    inputs = in_range(make_inputs(case, torch.float32), case.classes)
    got = run_forward(
        gpu, inputs, "pairwise", device=case.device, reduction=reduction, schedule=schedule
    )
    assert_path(got.launches, case, torch.float32, reduction)
    assert_matches_reference(got, inputs, "pairwise", reduction=reduction)


@pytest.mark.parametrize("name", ["grid-stride-warp", "grid-stride-any-k", "split", "cluster"])
def test_reduced_schedule_independent(gpu: EmulatedDevice, name: str):
    case = PATH_CASES[name]
    inputs = in_range(make_inputs(case, torch.float32), case.classes)
    first, second = (
        run_forward(gpu, inputs, "pairwise", device=case.device, schedule=s, reduction="mean")
        for s in ("forward", "reverse")
    )
    for a, b in zip(
        (first.loss, first.ce, first.mimicry, first.grad),
        (second.loss, second.ce, second.mimicry, second.grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The loss family (docs/design.md, Other divergences): reverse KL and JSD(beta), ce_weight,
# mimic_unlabeled and a normalizer. Any option off the paper's loss takes the any-K kernel (or the
# split), whatever K and dtype: the fixed-K kernels compute only the paper's loss.

FamilyOptions = dict[str, float | str | bool]
FAMILY = OPTIONS | {"ce_weight": 0.5, "mimic_unlabeled": True}
# The reverse KL's gradient is q_k (d - <q_k, d>) with d = w_k log q_k - sum_j W[k, j] log q_j:
# log-ratios of tens, not bounded as the JSD's log q_k - log m (at most -log(1 - beta)), so the
# exponentials' errors in q_k, and in the sum <q_k, d>, come times |d|. Measured in float32 over 30
# seeds at T = 2: up to 1.0e-5 at K = 3 and 4.3e-5 at K = 9 with peer weights (1.4 and 5.9 times
# GRAD_TOLERANCE's bound; the CPU op, with exact exponentials, errs a tenth as much). float64 stays
# within GRAD_TOLERANCE (a fifth of it at K = 9).
REVERSE_KL_GRAD_FACTOR = 8
FAMILY_CASE = Case("any-k-family", 3, 12, 72)  # the shape of "warp-vector", off its path
FAMILY_DIVERGENCES = [
    pytest.param({"divergence": "kl"}, id="kl"),
    pytest.param({"divergence": "reverse_kl"}, id="reverse_kl"),
    pytest.param({"divergence": "jsd", "beta": 0.3}, id="jsd-0.3"),
    pytest.param({"divergence": "jsd", "beta": 0.5}, id="jsd-0.5"),  # pairs share their mixture
]


def family_reference(
    inputs: tuple[Tensor, Tensor, Tensor],
    mode: str,
    options: FamilyOptions,
    reduction: str,
    row_scale: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss, ce and mimicry reduced as asked and the gradient of sum(row_scale * loss), in float64
    (fastdml.loss.reference.mutual_loss); for reduction "none", NaN in the rows of out-of-range
    targets, as in `reference` (the reduced cases keep their targets in range)."""
    logits, target, weights = inputs
    invalid = (target != IGNORE) & ((target < 0) | (target >= logits.shape[2]))
    assert reduction == "none" or not invalid.any()
    z = logits.detach().to(torch.float64).requires_grad_()
    problem = make_problem(
        z,
        torch.where(invalid, IGNORE, target),
        LossOptions(
            mode="pairwise" if mode == "weights" else mode,
            peer_weights=weights if mode == "weights" else None,
            ignore_index=IGNORE,
            reduction=reduction,
            **options,
        ),
    )
    loss, ce, mimicry = mutual_loss(problem, reduction)
    scale = torch.as_tensor(row_scale, dtype=torch.float64)
    (grad,) = torch.autograd.grad((scale * loss).sum(), z)
    if reduction != "none":
        return loss.detach(), ce, mimicry, grad
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    rows = [torch.where(invalid, nan, x) for x in (loss.detach(), ce, mimicry)]
    return *rows, torch.where(invalid[:, None], nan, grad)


def computed_divergence(options: FamilyOptions) -> str:
    """The divergence the kernels compute: "jsd" at beta 0 or 1 is the KL or the reverse KL."""
    divergence = options.get("divergence", "kl")
    if divergence == "jsd" and options["beta"] in (0, 1):
        return "kl" if options["beta"] == 0 else "reverse_kl"
    return divergence


def assert_family_path(
    launches: list[Launch], case: Case, options: FamilyOptions, compute_grad: bool = True
) -> None:
    """Never the fixed-K kernel: the any-K kernel's one launch, or the split's three, and for the
    reverse KL and the JSD a fourth ahead of the gradient (the sums over the row it needs), whose
    emit is left out where no gradient is asked for (it writes the gradient only)."""
    if split_expected(case):
        kl = computed_divergence(options) == "kl"
        sums = [] if kl else ["split_sums_kernel"]
        emit = ["split_emit_kernel"] if kl or compute_grad else []
        kernels = [launch.kernel.split("<")[0].strip() for launch in launches]
        want = ["split_stats_kernel", *sums, *emit, "split_finish_kernel"]
        assert kernels == want, f"expected the split, got {launches}"
        return
    assert len(launches) == 1, launches
    assert "launch_any_k" in launches[0].where, f"expected the any-K kernel, got {launches}"


def check_family(
    gpu: EmulatedDevice,
    case: Case,
    inputs: tuple[Tensor, Tensor, Tensor],
    mode: str,
    options: FamilyOptions,
    reduction: str = "none",
    row_scale: float | Tensor = ROW_SCALE,
    compute_grad: bool = True,
) -> None:
    """One forward with the family's options, on its path and within the tolerances of the
    paper's loss (a reduced term within those of its rows summed)."""
    dtype = inputs[0].dtype
    got = run_forward(
        gpu,
        inputs,
        mode,
        options,
        row_scale,
        device=case.device,
        reduction=reduction,
        compute_grad=compute_grad,
    )
    assert_family_path(got.launches, case, options, compute_grad)
    *want, grad = family_reference(inputs, mode, options, reduction, row_scale)
    rtol, atol = ROW_TOLERANCE[dtype]
    atol *= 1 if reduction == "none" else case.peers * case.rows
    assert_terms_close(got, want, rtol, atol)
    if not compute_grad:
        assert got.grad is None
        return
    rtol, atol = GRAD_TOLERANCE[dtype]
    if computed_divergence(options) == "reverse_kl" and dtype != torch.float64:
        compute_rtol, compute_atol = _GRAD_COMPUTE[torch.float32]
        rtol += (REVERSE_KL_GRAD_FACTOR - 1) * compute_rtol
        atol = REVERSE_KL_GRAD_FACTOR * compute_atol
    torch.testing.assert_close(
        got.grad.double(), grad, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"grad: {m}"
    )


@pytest.mark.parametrize("divergence", FAMILY_DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_family_divergences(
    gpu: EmulatedDevice, mode: str, dtype: torch.dtype, divergence: FamilyOptions
):
    """Each divergence in each mode, per row: ce_weight 0.5 and the ignored row's mimicry kept
    (mimic_unlabeled), with a scale per peer and row."""
    case = FAMILY_CASE
    inputs = in_range(make_inputs(case, dtype), case.classes)
    row_scale = make_row_scale(case.peers, case.rows, dtype)
    check_family(gpu, case, inputs, mode, FAMILY | divergence, row_scale=row_scale)


# Each option alone off the paper's loss (it alone takes the any-K kernel), then together.
FAMILY_REDUCTIONS = [
    pytest.param("mean", {"normalizer": 7.5}, id="mean-normalizer"),
    pytest.param("mean", {"mimic_unlabeled": True}, id="mean-unlabeled"),
    pytest.param("none", {"divergence": "jsd", "beta": 0.0, "ce_weight": 0.0}, id="jsd-0-ce0"),
    pytest.param("sum", {"divergence": "jsd", "beta": 1.0}, id="sum-jsd-1"),
    pytest.param("sum", {"divergence": "jsd", "beta": 0.3, "ce_weight": 0.0}, id="sum-jsd-ce0"),
    # The mimicry averaged over the labeled rows, the cross-entropy too.
    pytest.param("mean", {"divergence": "jsd", "beta": 0.5, "ce_weight": 0.5}, id="mean-jsd"),
    pytest.param(
        "mean",
        {"divergence": "reverse_kl", "mimic_unlabeled": True, "temperature": 1.0},
        id="mean-reverse_kl-unlabeled-T1",
    ),
    pytest.param(
        "mean",
        FAMILY | {"divergence": "jsd", "beta": 0.3, "normalizer": 7.5},
        id="mean-jsd-unlabeled-normalizer",
    ),
]


@pytest.mark.parametrize(("reduction", "options"), FAMILY_REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["pairwise", "ensemble_logits"])
def test_family_reductions(
    gpu: EmulatedDevice, mode: str, dtype: torch.dtype, reduction: str, options: FamilyOptions
):
    """Reductions of the family: "mean" divides the cross-entropy by the labeled rows and
    the mimicry by the mimicked ones (or both by the normalizer), its gradient too; "jsd" at beta
    0 and 1 is the KL and the reverse KL."""
    case = FAMILY_CASE
    inputs = in_range(make_inputs(case, dtype), case.classes)
    check_family(gpu, case, inputs, mode, OPTIONS | options, reduction)


# The split of few long rows, 9 peers' teams going on to further rows, and 2 peers (one pair, whose
# two JSDs share their mixture at beta 0.5).
FAMILY_PATHS = [
    ("split", torch.float32, "pairwise", "none", FAMILY | {"divergence": "jsd", "beta": 0.5}),
    ("split", torch.float64, "weights", "mean", FAMILY | {"divergence": "reverse_kl"}),
    ("split", torch.bfloat16, "ensemble_logits", "sum", {"divergence": "jsd", "beta": 0.3}),
    ("split", torch.float32, "ensemble", "mean", FAMILY | {"normalizer": 7.5}),
    ("grid-stride-any-k", torch.float32, "pairwise", "mean", FAMILY | {"normalizer": 7.5}),
    ("grid-stride-any-k", torch.float64, "weights", "none", {"divergence": "jsd", "beta": 0.3}),
    ("grid-stride-any-k", torch.float16, "ensemble", "sum", FAMILY | {"divergence": "reverse_kl"}),
    ("grid-stride-any-k", torch.float32, "weights", "none", FAMILY | {"divergence": "reverse_kl"}),
    (
        "warp-scalar-odd-classes",
        torch.float32,
        "pairwise",
        "mean",
        {"divergence": "jsd", "beta": 0.5},
    ),
]


@pytest.mark.parametrize(
    ("name", "dtype", "mode", "reduction", "options"),
    [pytest.param(*path, id="-".join(map(str, path[:4]))) for path in FAMILY_PATHS],
)
def test_family_paths(
    gpu: EmulatedDevice,
    name: str,
    dtype: torch.dtype,
    mode: str,
    reduction: str,
    options: FamilyOptions,
):
    """The family on the split's kernels and on the any-K kernel's grid-stride loop, in every
    dtype."""
    case = PATH_CASES[name]
    inputs = in_range(make_inputs(case, dtype), case.classes)
    check_family(gpu, case, inputs, mode, OPTIONS | options, reduction)


@pytest.mark.parametrize("name", ["split", "any-k-long-rows"])
@pytest.mark.parametrize("divergence", FAMILY_DIVERGENCES[1:])
def test_family_without_gradient(gpu: EmulatedDevice, name: str, divergence: FamilyOptions):
    """The loss alone (inference): the same terms, and no gradient written (the split launches
    no emit for the divergences other than KL, whose emit writes the gradient only)."""
    case = PATH_CASES[name]
    inputs = in_range(make_inputs(case, torch.float32), case.classes)
    check_family(gpu, case, inputs, "pairwise", FAMILY | divergence, "sum", compute_grad=False)


def test_family_target_out_of_range(gpu: EmulatedDevice):
    """As in the paper's loss, the rows of out-of-range targets are NaN, the others right."""
    inputs = make_inputs(FAMILY_CASE, torch.float32)
    options = OPTIONS | {"divergence": "jsd", "beta": 0.3, "ce_weight": 0.5}
    check_family(gpu, FAMILY_CASE, inputs, "ensemble_logits", options)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_family_without_labels(gpu: EmulatedDevice, reduction: str):
    """A mimicry-only loss with no targets (every row ignore_index, mimic_unlabeled): every row
    mimicked, "mean" over all of them, and no cross-entropy."""
    case = FAMILY_CASE
    logits, target, weights = make_inputs(case, torch.float32)
    options = FAMILY | {"divergence": "jsd", "beta": 0.5, "ce_weight": 0.0}
    inputs = (logits, torch.full_like(target, IGNORE), weights)
    check_family(gpu, case, inputs, "pairwise", options, reduction)


# ---------------------------------------------------------------------------------------------
# Shared memory at the 48 KiB a kernel may have without opting in.

SMEM_WITHOUT_OPT_IN = 48 * 1024
HALF = (torch.float16, torch.bfloat16)

# Shapes for which the launchers give a block 48 KiB of dynamic shared memory or a little less
# (K = 5's 47.5 KiB): within the 48 KiB a kernel may have without opting in (with
# cudaFuncAttributeMaxDynamicSharedMemorySize), but not with the kernel's static shared memory
# (0.1 to 2.3 KiB) added, so a GPU refuses the launch (cudaErrorInvalidValue) unless the launcher
# opted in. The fixed-K kernel's row cache is whole steps of 256 * K * (bytes a load) bytes: 48 KiB
# where steps * K * (bytes a load) = 192. Found by sweeping C for K = 2..8 and each dtype (none
# for K = 7), the fewest classes of each kind of team and loads (float16 and bfloat16 alike).
# The any-K kernel's K * 52 bytes (K * 104 for float64) pass 48 KiB less its static shared memory
# (272 bytes for float64) from K = 471 for float64. A warp per row: 8 rows, one block; a
# block per row: 2 rows, fewer than 8192 classes (not split).
H200Case = partial(Case, device=H200)
SMEM_48K_CASES = [
    (H200Case("k2-warp-vector", 2, 8, 1288), torch.float16),
    (H200Case("k2-warp-vector", 2, 8, 644), torch.float32),
    (H200Case("k2-block-vector", 2, 2, 5124, team="block"), torch.float32),
    (H200Case("k2-block-scalar", 2, 2, 5889, vector=False, team="block"), torch.float32),
    (H200Case("k3-warp-vector", 3, 8, 776), torch.bfloat16),
    (H200Case("k3-warp-vector", 3, 8, 388), torch.float32),
    (H200Case("k3-block-vector", 3, 2, 6152, team="block"), torch.float16),
    (H200Case("k3-block-scalar", 3, 2, 3841, vector=False, team="block"), torch.float32),
    (H200Case("k4-warp-vector", 4, 8, 760), torch.float16),
    (H200Case("k4-warp-vector", 4, 8, 260), torch.float32),
    (H200Case("k4-block-scalar", 4, 2, 5889, vector=False, team="block"), torch.bfloat16),
    (H200Case("k5-block-scalar", 5, 2, 4609, vector=False, team="block"), torch.float16),
    (H200Case("k6-warp-vector", 6, 8, 388), torch.bfloat16),
    (H200Case("k6-warp-scalar", 6, 8, 225, vector=False), torch.float32),
    (H200Case("k6-block-scalar", 6, 2, 3841, vector=False, team="block"), torch.float16),
    (H200Case("k8-warp-vector", 8, 8, 260), torch.float16),
    (H200Case("k8-warp-scalar", 8, 8, 161, vector=False), torch.float32),
    (H200Case("k8-block-vector", 8, 2, 1026, team="block"), torch.float32),
    (H200Case("k8-block-scalar", 8, 2, 2817, vector=False, team="block"), torch.bfloat16),
    (H200Case("any-k", 471, 1, 2), torch.float64),
]


def assert_past_48k(launches: list[Launch]) -> None:
    """The launch is one the 48 KiB rule is about: the case still tests what it is there for."""
    (launch,) = launches
    total = launch.dynamic_shared + launch.static_shared
    assert launch.dynamic_shared <= SMEM_WITHOUT_OPT_IN < total, (
        f"expected at most 48 KiB of dynamic shared memory and more with the static, got {launch}"
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_shared_memory_48k_on_h200(gpu: EmulatedDevice, dtype: torch.dtype):
    """What failed on an H200 (cudaErrorInvalidValue at launch): K = 3, R = 64, C = 1000 in
    float16 or bfloat16 cache the rows in exactly 48 KiB of dynamic shared memory, and with the
    kernel's static shared memory that is more than a kernel may have without opting in to it, so
    the launcher must set cudaFuncAttributeMaxDynamicSharedMemorySize."""
    case = Case("h200-48k", 3, 64, 1000, device=H200)
    inputs = make_inputs(case, dtype)
    got = run_forward(gpu, inputs, "pairwise", device=H200)
    assert_path(got.launches, case, dtype)
    assert_past_48k(got.launches)
    assert_matches_reference(got, inputs, "pairwise")


@pytest.mark.parametrize(
    ("case", "dtype"), [pytest.param(c, d, id=f"{c}-{c.classes}-{d}") for c, d in SMEM_48K_CASES]
)
def test_shared_memory_48k_shapes(gpu: EmulatedDevice, case: Case, dtype: torch.dtype):
    """Every kind of launch whose dynamic shared memory fits in 48 KiB but not with the static
    (SMEM_48K_CASES), on an H200: the launchers opt in, and the results are right."""
    inputs = make_inputs(case, dtype)
    got = run_forward(gpu, inputs, "pairwise", device=H200)
    assert_path(got.launches, case, dtype)
    assert_past_48k(got.launches)
    assert_matches_reference(got, inputs, "pairwise")


# ---------------------------------------------------------------------------------------------
# The backward.


@dataclass(frozen=True)
class ScaleCase:
    name: str
    peers: int
    rows: int
    classes: int
    offset: int = 0  # elements from a 256-byte aligned address to the gradient
    vector: bool = True
    team: str = "warp"
    device: DeviceInfo = H100

    def __str__(self) -> str:
        return self.name


SCALE_CASES = [
    ScaleCase("warp-vector", 3, 10, 64),
    ScaleCase("warp-scalar", 3, 10, 37, vector=False),
    ScaleCase("warp-scalar-misaligned", 3, 6, 64, offset=1, vector=False),
    ScaleCase("block-vector", 2, 3, 8200, team="block"),
    ScaleCase("block-scalar", 2, 3, 1031, vector=False, team="block"),
    ScaleCase("grid-stride", 3, 100, 16, device=ONE_SM),  # 300 rows for 32 blocks of 8 warps
]


@pytest.mark.parametrize("per_row", [False, True], ids=["one-value", "per-row"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(gpu: EmulatedDevice, dtype: torch.dtype, case: ScaleCase, per_row: bool):
    """The backward scales row (k, r) by grad_loss[k, r] (one value, or one per peer and row),
    and leaves it bit for bit alone where that is 1 (the forward already wrote the gradient)."""
    k, r, c = case.peers, case.rows, case.classes
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    storage = torch.randn(k * r * c + 256).to(dtype)
    aligned = (-storage.data_ptr() // storage.element_size()) % (256 // storage.element_size())
    grad = storage[aligned + case.offset :][: k * r * c].view(k, r, c)
    if per_row:
        grad_loss = torch.rand(r, k, dtype=acc).t()  # [K, R] with strides (1, K)
        for i, j in [(0, slice(None)), (1, 1), (-1, 0)]:  # rows the forward's gradient is right for
            grad_loss[i, j] = 1.0
    else:
        grad_loss = torch.tensor(ROW_SCALE, dtype=acc)
    before = grad.clone()
    launches = gpu.scale_grad_(grad, grad_loss, device=case.device)

    # The factor in the accumulation dtype, the product rounded to the gradient's dtype.
    factor = grad_loss.double().expand(k, r)
    want = before.double() * factor[..., None]
    finfo = torch.finfo(dtype)
    torch.testing.assert_close(grad.double(), want, rtol=2 * finfo.eps, atol=finfo.tiny)
    same = (factor == 1)[:, :, None].expand_as(grad)
    assert torch.equal(grad[same], before[same]), "rows with grad_loss == 1 must not change"

    (launch,) = launches
    vector = not launch.kernel.replace(" ", "").endswith(",1>")
    assert vector == case.vector, f"expected vector loads: {case.vector}, got {launch}"
    teams = 256 // 32 if case.team == "warp" else 1
    blocks = min(-(-k * r // teams), 32 * case.device.num_sms)
    assert launch.blocks == blocks, f"expected a {case.team} per row, got {launch}"


# ---------------------------------------------------------------------------------------------
# The emulator itself (tests/cuda_emulation/selftest.cu).

SHUFFLES = {"idx": 0, "up": 1, "down": 2, "xor": 3}


def hardware_shuffle_source(kind: str, lane: int, arg: int, width: int) -> int:
    """The lane whose value `lane` gets, as the CUDA programming guide describes __shfl*_sync:
    segments of `width` lanes; a source outside the lane's segment leaves it its own value, but
    xor may read from an earlier segment."""
    start = lane // width * width
    if kind == "idx":
        return start + arg % width
    if kind == "up":
        return lane - arg if lane - start >= arg else lane
    if kind == "down":
        return lane + arg if lane - start + arg < width else lane
    source = lane ^ arg
    return source if source < start + width else lane


@pytest.mark.parametrize("arg", [0, 1, 3, 16, 31])
@pytest.mark.parametrize("width", [32, 16, 4])
@pytest.mark.parametrize("kind", SHUFFLES)
def test_emulator_shuffles_as_hardware(gpu: EmulatedDevice, kind: str, width: int, arg: int):
    out = gpu.selftest("shuffle", kind=SHUFFLES[kind], arg=arg, width=width)
    want = [
        100 * (t // 32 * 32 + hardware_shuffle_source(kind, t % 32, arg, width)) for t in range(256)
    ]
    assert out == want


def test_emulator_butterfly_and_shared_memory(gpu: EmulatedDevice):
    warp_sums = [sum(2 * t + 1 for t in range(w * 32, w * 32 + 32)) for w in range(8)]
    assert gpu.selftest("butterfly") == [warp_sums[t // 32] for t in range(256)]
    for schedule in ("forward", "reverse", "shuffled"):
        assert gpu.selftest("reverse", schedule=schedule) == list(range(255, -1, -1))
        assert gpu.selftest("publish", arg=1, schedule=schedule) == [42] * 256


def test_emulator_schedules_expose_a_missing_barrier(gpu: EmulatedDevice):
    """Thread 0 writes shared memory that the others read with no barrier between: run first it
    looks right, run last the others read the poison (NaN bytes) the block's memory starts with."""
    assert gpu.selftest("publish", arg=0, schedule="forward") == [42] * 256
    assert gpu.selftest("publish", arg=0, schedule="reverse") == [42] + [-1] * 255


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("divergent_barrier", "different __syncthreads"),
        ("exited_lane", "exits while lane"),
        ("deadlock", "deadlock"),
        ("misaligned_load", "misaligned address"),
        ("too_much_dynamic_smem", "CUDA error 1:"),  # cudaErrorInvalidValue
        ("empty_grid", "CUDA error 9:"),  # cudaErrorInvalidConfiguration
    ],
)
def test_emulator_reports_what_a_gpu_would_hang_on_or_refuse(
    gpu: EmulatedDevice, name: str, message: str
):
    with pytest.raises(EmulationError, match=message):
        gpu.selftest(name)


KIB = 1024


@pytest.mark.parametrize(
    ("dynamic", "attribute", "optin", "refusal"),
    [
        pytest.param(47 * KIB, -1, H200.smem_per_block_optin, None, id="48k-in-all"),
        pytest.param(47 * KIB + 1, -1, H200.smem_per_block_optin, "without", id="past-48k"),
        pytest.param(48 * KIB, -1, H200.smem_per_block_optin, "without", id="48k-dynamic"),
        pytest.param(48 * KIB, 48 * KIB, H200.smem_per_block_optin, None, id="opted-in"),
        pytest.param(
            48 * KIB,
            48 * KIB - 1,
            H200.smem_per_block_optin,
            "than the kernel's",
            id="opted-in-short",
        ),
        pytest.param(63 * KIB, 63 * KIB, 64 * KIB, None, id="optin-in-all"),
        pytest.param(63 * KIB + 1, 63 * KIB + 1, 64 * KIB, "smem_per_block_optin", id="past-optin"),
        pytest.param(KIB, 64 * KIB, 64 * KIB, "smem_per_block_optin", id="attribute-past-optin"),
    ],
)
def test_emulator_shared_memory_launch_rules(
    gpu: EmulatedDevice, dynamic: int, attribute: int, optin: int, refusal: str | None
):
    """A launch counts the kernel's static shared memory (1 KiB here) with the dynamic, as a GPU
    does: over 48 KiB together it needs cudaFuncAttributeMaxDynamicSharedMemorySize of at least
    the dynamic size (attribute -1: not set), and never more than smem_per_block_optin, nor may
    the attribute with the static size be more; else cudaErrorInvalidValue."""
    run = partial(
        gpu.selftest,
        "static_and_dynamic_smem",
        kind=attribute,
        arg=dynamic,
        smem_per_block_optin=optin,
    )
    if refusal is None:
        assert run() == [1000 * (255 - t) + t for t in range(256)]
    else:
        with pytest.raises(EmulationError, match=f"CUDA error 1: .*refused.*{refusal}"):
            run()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arg", [1, 3, 32, 300])
def test_emulator_syncthreads_count(gpu: EmulatedDevice, arg: int, schedule: str):
    """Every thread gets the number of the block's threads whose predicate was nonzero (any
    nonzero value counts once); each __syncthreads_count is a block barrier of the launch."""
    first = sum(1 for t in range(256) if t % arg == 0)
    second = min(arg, 256)
    out = gpu.selftest("syncthreads_count", arg=arg, schedule=schedule)
    assert out == [1000 * first + second] * 256
    assert [launch.block_barriers for launch in gpu.launches()] == [2]


@pytest.mark.parametrize("blocks", [1, 2, 7, 100])
def test_emulator_atomic_ticket_after_memset(gpu: EmulatedDevice, blocks: int):
    """The last-block pattern: each block takes a ticket with atomicAdd on a counter that
    cudaMemsetAsync zeroed (it held garbage), and the block with the last ticket (the last to
    run here) knows it. The memset is not a launch."""
    out = gpu.selftest("atomic_ticket", arg=blocks)
    assert out == list(range(blocks)) + [1000 + blocks - 1] * (256 - blocks)
    assert [(launch.blocks, launch.block_barriers) for launch in gpu.launches()] == [
        (blocks, blocks)
    ]


@pytest.mark.parametrize("schedule", ["forward", "reverse", "warps_reverse"])
def test_emulator_atomic_add(gpu: EmulatedDevice, schedule: str):
    """atomicAdd of every type, by each of 256 threads: it returns the value before the add (so
    the threads' tickets follow the order they ran in), an int wraps around, an unsigned long long
    carries past 32 bits, and a float add flushes subnormals to zero as the hardware's does."""
    out = gpu.selftest("atomic_add", schedule=schedule)
    int_end = (2**31 - 1 - 99 + 256) - 2**32  # from INT_MAX - 99, wrapped
    assert out[:7] == [256, int_end, 256, 256, 128, 0, 64]
    ticket = (lambda t: t) if schedule == "forward" else (lambda t: 255 - t)
    assert out[7:] == [ticket(t) for t in range(7, 256)]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("divergent_syncthreads_count", "different __syncthreads"),
        ("misaligned_atomic", "misaligned address .* 8-byte access"),
        # cudaErrorLaunchFailure, and the word left as it was
        ("memset_after_error", "cudaMemsetAsync: CUDA error 719, word 7$"),
    ],
)
def test_emulator_reports_misused_counts_and_atomics(gpu: EmulatedDevice, name: str, message: str):
    with pytest.raises(EmulationError, match=message):
        gpu.selftest(name)


# Thread-block clusters: the selftest's kernel publishes each block's index + 1 (a __shared__
# word) and 1000 * that + t (dynamic word t); thread t sums both over its cluster's blocks, through
# map_shared_rank, plus 100000 * its warp's index in the block (a shuffle within the warp).
BOTH_CLUSTER_BARRIERS = 3


def cluster_sums(blocks: int, threads: int, cluster: int) -> list[int]:
    want = []
    for block in range(blocks):
        first = block // cluster * cluster
        published = sum(b + 1 for b in range(first, first + cluster))
        want += [1001 * published + cluster * t + 100000 * (t // 32) for t in range(threads)]
    return want + [-7] * (256 - blocks * threads)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    ("blocks", "threads", "cluster"),
    [(8, 32, 4), (4, 48, 4), (6, 40, 2), (8, 32, 8), (3, 64, 1), (2, 128, 0)],
)
def test_emulator_cluster_shared_memory(
    gpu: EmulatedDevice, schedule: str, blocks: int, threads: int, cluster: int
):
    """Each block of a cluster has its own shared memory, which the cluster's blocks read through
    map_shared_rank after a cluster barrier, under every schedule; a plain launch (cluster 0) is a
    cluster of one block. Warps stay within their block where its size is not a multiple of 32.
    Each cluster barrier is one episode per cluster."""
    out = gpu.selftest(
        "cluster_sum",
        kind=BOTH_CLUSTER_BARRIERS,
        arg=blocks,
        threads=threads,
        cluster=cluster,
        schedule=schedule,
    )
    assert out == cluster_sums(blocks, threads, max(cluster, 1))
    (launch,) = gpu.launches()
    assert (launch.cluster, launch.cluster_barriers, launch.block_barriers) == (
        max(cluster, 1),
        2 * blocks // max(cluster, 1),
        0,
    )


def test_emulator_schedules_expose_a_missing_cluster_barrier(gpu: EmulatedDevice):
    """Without the cluster barrier between the writes and the reads of the other blocks' shared
    memory, a block reads another's before that one wrote it (the poison it starts with)."""
    want = cluster_sums(8, 32, 4)
    run = partial(gpu.selftest, "cluster_sum", kind=2, arg=8, threads=32, cluster=4)
    assert any(run(schedule=schedule) != want for schedule in SCHEDULES)


def test_emulator_poisons_the_shared_memory_of_an_ended_block(gpu: EmulatedDevice):
    """Without the cluster barrier before the end, a block may end while the others still read
    its shared memory (undefined on a GPU). Run a warp at a time, the warp that completes the
    cluster barrier (block 3's, the last to arrive) runs on to its end, and block 0 then reads
    poison (-1) where block 3's words were."""
    out = gpu.selftest(
        "cluster_sum", kind=1, arg=4, threads=32, cluster=4, schedule="warps_forward"
    )
    want = cluster_sums(4, 32, 4)
    assert out[96:128] == want[96:128]
    assert out[:32] == [w - (4 + 4000 + t) - 2 for t, w in enumerate(want[:32])]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("divergent_cluster_barrier", {}, "different cluster barriers"),
        ("cluster_deadlock", {}, r"blocks 0..1: deadlock.*block 0 thread 0 at cluster\.sync\(\)"),
        ("map_shared_rank", {"arg": 2}, "map_shared_rank to rank 2 in a cluster of 2 blocks"),
        ("map_shared_rank", {"arg": -1}, "not in the block's shared memory"),
        # cudaErrorInvalidClusterSize, from the launch and as the last error
        (
            "cluster_sum",
            {"arg": 6, "threads": 32, "cluster": 4},
            r"CUDA error 912 \(last error 912\).*a cluster of 4 blocks with 6 blocks",
        ),
        ("cluster_sum", {"arg": 8, "threads": 32, "cluster": 16}, r"CUDA error 912 \("),
        ("cluster_2d", {"arg": 8, "threads": 32, "cluster": 2}, "supports 1-D clusters"),
        # cudaErrorNotSupported on a device without clusters
        (
            "cluster_sum",
            {"arg": 4, "threads": 32, "cluster": 2, "device": NO_SMEM},
            r"CUDA error 801 \(last error 801\).*without thread-block clusters",
        ),
    ],
)
def test_emulator_reports_misused_clusters(
    gpu: EmulatedDevice, name: str, options: dict, message: str
):
    with pytest.raises(EmulationError, match=message):
        gpu.selftest(name, **options)


@pytest.mark.parametrize(
    ("dynamic", "arg", "threads", "cluster", "want"),
    [
        # 2048 threads a multiprocessor: 8 blocks of 256, in clusters of 4 on 132 SMs.
        pytest.param(0, 0, 256, 4, [264, 0], id="threads"),
        # Shared memory: 228 KiB / (1 KiB reserved + 8 KiB taken for the static size) = 25.
        pytest.param(0, 0, 64, 4, [825, 0], id="unknown-static"),
        # 110 KiB of dynamic: 1 block a multiprocessor with 8 KiB for the static size, 2 with the
        # 16 bytes the launch found.
        pytest.param(110 * KIB, 3, 64, 2, [66, 0, 132, 0], id="known-static"),
        pytest.param(110 * KIB, 0, 64, 2, [0, 0], id="past-48k-without-attribute"),
        pytest.param(0, 0, 64, 16, [0, 0], id="non-portable-size"),
    ],
)
def test_emulator_max_active_clusters(
    gpu: EmulatedDevice, dynamic: int, arg: int, threads: int, cluster: int, want: list[int]
):
    out = gpu.selftest(
        "occupancy",
        kind=dynamic,
        arg=arg,
        threads=threads,
        cluster=cluster,
        smem_per_block_optin=H100.smem_per_block_optin,
    )
    assert out[: len(want)] == want


def test_emulator_max_active_clusters_without_clusters(gpu: EmulatedDevice):
    """A device before sm_90 has no clusters: an error (cudaErrorNotSupported) and 0."""
    out = gpu.selftest("occupancy", threads=64, cluster=2, device=NO_SMEM)
    assert out[:2] == [0, 801]
