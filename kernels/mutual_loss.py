"""Triton kernels of the mutual loss, as the custom ops `fastdml::triton_mutual_loss_with_grad` and
`fastdml::triton_scale_grad_rows_` (the same contract as the CUDA ops of csrc/ops.cpp).

The forward reads each row's K x C block of logits (once when it fits one tile, else twice: online
log-sum-exps, then probabilities), and writes every peer's loss terms and the gradient of
`row_scale * loss`. The backward only rescales rows whose upstream gradient is not `row_scale`:
for reduction "mean" and "sum" none are, so it reads one scalar per row and writes nothing.
One program per row, peers on the first axis of a [K_PAD, BLOCK_C] tile; when there are too few
rows to fill the GPU, a row's classes are split across programs (three launches, merged in a fixed
order, so results stay deterministic).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from fastdml.loss.arguments import accumulation_dtype

MODE_IDS = {"pairwise": 0, "ensemble": 1, "ensemble_logits": 2, "weights": 3}
MAX_PEERS = 16  # modes 2 and 3 hold [K_PAD, K_PAD, BLOCK_C] temporaries: beyond, the CUDA op
# Of the largest temporary tile (accumulation dtype), and of it per thread: registers, no spills.
# FASTDML_TRITON_TILE=BYTES,ELEMENTS overrides them (benchmarks/gpu_tune.py measures choices).
_MAX_TILE_BYTES, _THREAD_ELEMENTS = map(
    int, os.environ.get("FASTDML_TRITON_TILE", "4096,8").split(",")
)
if any(n < 1 or n & (n - 1) for n in (_MAX_TILE_BYTES, _THREAD_ELEMENTS)):
    raise ValueError(
        "FASTDML_TRITON_TILE must be two powers of 2, BYTES,ELEMENTS (tile bytes, elements a "
        f"thread), got {_MAX_TILE_BYTES},{_THREAD_ELEMENTS}"
    )
SPLIT_PROGRAMS = 512  # rows fewer than this split their classes across programs...
SPLIT_MIN_CLASSES = 16384  # ...into chunks of at least this many classes
_SCALE_BLOCK = 1024


@triton.jit
def _online_lse(m, s, x):
    """Merges a tile x [K_PAD, BLOCK_C] into running (max, sum of exp(x - max)) per peer."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - ref) + tl.sum(tl.exp(x - ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _finish_lse(m, s):
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(s)


@triton.jit
def _others_mean(z, peers, K):
    """u[k] = sum_{j != k} z[j] / (K - 1), summed as such (total - own is NaN at -inf)."""
    pick = (peers[:, None] != peers[None, :]) & (peers[None, :] < K)
    return tl.sum(tl.where(pick[:, :, None], z[None, :, :], 0.0), axis=1) / (K - 1)


@triton.jit
def _grad_scale(scale_ptr, peers, r, stride_k, stride_r, K, ACC: tl.constexpr):
    """The factor of each peer's gradient row: the scale given (0-dim, or [K, R] any strides),
    or 1 where it is 0, so that no gradient is lost before the backward rescales it."""
    s = tl.load(scale_ptr + peers.to(tl.int64) * stride_k + r * stride_r, mask=peers < K, other=1.0)
    s = s.to(ACC)
    return tl.where(s == 0, 1.0, s)


@triton.jit
def _weighted_targets(weights, q, K_PAD: tl.constexpr):
    """t[k] = sum_j W[k, j] q[j]. From 16 peers the compiler would turn the broadcast product into
    a TF32 matrix product (an error of 1e-3); the explicit one is exact in float32."""
    if K_PAD >= 16:
        return tl.dot(weights, q, input_precision="ieee", out_dtype=q.dtype)
    return tl.sum(weights[:, :, None] * q[None, :, :], axis=1)


@triton.jit
def _p_log_q(p, log_q):
    return tl.where(p == 0, 0.0, p * log_q)


@triton.jit
def _load_tile(logits_ptr, offsets, cols, c0, C, live):
    cls = c0 + cols
    mask = live & (cls < C)[None, :]
    return tl.load(logits_ptr + offsets + cls[None, :], mask=mask, other=float("-inf"))


@triton.jit
def _scaled_tiles(z, peers, inv_t, K, MODE: tl.constexpr, HAS_T: tl.constexpr):
    """z / T and, for ensemble_logits, the others' mean logits / T (else z / T again)."""
    zt = z * inv_t if HAS_T else z
    u = _others_mean(z, peers, K) * inv_t if MODE == 2 else zt
    return zt, u


@triton.jit
def _row_output(value, ignored, bad_target):
    """0 at ignored rows (nothing there may leak), NaN at rows with an out-of-range target."""
    return tl.where(ignored, 0.0, tl.where(bad_target, float("nan"), value))


@triton.jit
def _pass_1(
    logits_ptr,
    offsets,
    cols,
    c_lo,
    c_hi,
    C,
    live,
    peers,
    inv_t,
    stats,
    K,
    MODE,
    HAS_T,
    HAS_SMOOTHING,
    BLOCK_C,
):
    """Online log-sum-exps over classes [c_lo, c_hi): of z, z / T and (ensemble_logits) the
    others' mean logits / T, per peer, and sum_c z (label smoothing)."""
    m, s, mt, st, mu, su, sum_z = stats
    for c0 in range(c_lo, c_hi, BLOCK_C):
        z = _load_tile(logits_ptr, offsets, cols, c0, C, live).to(m.dtype)
        zt, u = _scaled_tiles(z, peers, inv_t, K, MODE, HAS_T)
        m, s = _online_lse(m, s, z)
        if HAS_T:
            mt, st = _online_lse(mt, st, zt)
        if MODE == 2:
            mu, su = _online_lse(mu, su, u)
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where((c0 + cols)[None, :] < C, z, 0.0), axis=1)
    return m, s, mt, st, mu, su, sum_z


@triton.jit
def _merge_partial_stats(
    stats_ptr, r, splits, peers, SPLITS_PAD: tl.constexpr, K_PAD: tl.constexpr
):
    """The stats of a row from its splits' partial ones, merged in a fixed order."""
    parts = tl.arange(0, SPLITS_PAD)
    base = ((r * splits + parts[:, None]) * 7) * K_PAD + peers[None, :]
    live = (parts < splits)[:, None] & (peers < K_PAD)[None, :]
    m_all = tl.load(stats_ptr + base, mask=live, other=float("-inf"))
    m = tl.max(m_all, axis=0)
    s = tl.sum(tl.load(stats_ptr + base + K_PAD, mask=live, other=0.0) * _rescale(m_all, m), axis=0)
    mt_all = tl.load(stats_ptr + base + 2 * K_PAD, mask=live, other=float("-inf"))
    mt = tl.max(mt_all, axis=0)
    st_all = tl.load(stats_ptr + base + 3 * K_PAD, mask=live, other=0.0)
    st = tl.sum(st_all * _rescale(mt_all, mt), axis=0)
    mu_all = tl.load(stats_ptr + base + 4 * K_PAD, mask=live, other=float("-inf"))
    mu = tl.max(mu_all, axis=0)
    su = tl.sum(
        tl.load(stats_ptr + base + 5 * K_PAD, mask=live, other=0.0) * _rescale(mu_all, mu), axis=0
    )
    sum_z = tl.sum(tl.load(stats_ptr + base + 6 * K_PAD, mask=live, other=0.0), axis=0)
    return m, s, mt, st, mu, su, sum_z


@triton.jit
def _rescale(m_part, m):
    """exp(m_part - m): the factor that moves a partial sum of exps to the merged max."""
    return tl.exp(m_part - tl.where(m == float("-inf"), 0.0, m)[None, :])


# Integers that only bound loops are not specialized (each value, or its divisibility by 16,
# would compile another kernel). The number of classes and the logits' strides are: a C divisible
# by 16 lets the compiler prove the masks and addresses of a vector of classes aligned, and emit
# 16-byte loads and stores instead of one per element.
@triton.jit(
    do_not_specialize=[
        "R", "stride_scale_k", "stride_scale_r", "chunk", "splits", "ignore_index", "K",
    ]
)  # fmt: skip
def _mutual_loss_with_grad_kernel(
    logits_ptr,
    target_ptr,
    weights_ptr,
    scale_ptr,
    loss_ptr,
    ce_ptr,
    mimicry_ptr,
    grad_ptr,
    stats_ptr,
    sums_ptr,
    R,
    C,
    stride_k,
    stride_r,
    stride_scale_k,
    stride_scale_r,
    chunk,
    splits,
    K,
    inv_t_hi,
    inv_t_lo,
    alpha_t_hi,
    alpha_t_lo,
    alpha_t2_hi,
    alpha_t2_lo,
    smoothing_hi,
    smoothing_lo,
    ignore_index,
    STAGE: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MODE: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):
    """One row (grid axis 0), or one chunk of a row's classes (axis 1) when C is split.

    STAGE 0: the whole op for a row; SINGLE_TILE (decided on the host: C <= BLOCK_C) keeps the
    row's one tile from pass 1 for pass 2, so the logits are read once. A row split over programs
    takes three launches: STAGE 1 writes each chunk's partial log-sum-exps to `stats`, STAGE 2
    merges them, writes the chunk's gradient and its partial loss sums to `sums`, STAGE 3 merges
    those into the row's outputs.
    """
    r = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    c_lo = tl.multiple_of(part * chunk, BLOCK_C)  # chunks are whole tiles
    c_hi = tl.minimum(c_lo + chunk, C)
    peers = tl.arange(0, K_PAD)
    cols = tl.arange(0, BLOCK_C)
    peer_live = peers < K
    y = tl.load(target_ptr + r)
    valid = y != ignore_index
    ignored = y == ignore_index
    bad_target = valid & ((y < 0) | (y >= C))
    y_safe = tl.where(valid & (y >= 0) & (y < C), y, 0)
    # Ignored rows load nothing. (Masks are built from integer bounds, not by broadcasting a
    # scalar bool, which Triton's interpreter rejects.)
    live_peers = peers < tl.where(valid, K, 0)
    live = live_peers[:, None]
    peer_offsets = peers.to(tl.int64) * stride_k + r * stride_r
    offsets = peer_offsets[:, None]
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    alpha_t = tl.cast(alpha_t_hi, ACC) + tl.cast(alpha_t_lo, ACC)
    smoothing = tl.cast(smoothing_hi, ACC) + tl.cast(smoothing_lo, ACC)
    neg_inf = tl.full([K_PAD], float("-inf"), ACC)
    zero = tl.zeros([K_PAD], ACC)
    stats = (neg_inf, zero, neg_inf, zero, neg_inf, zero, zero)
    sums_offsets = ((r * splits + part) * 2) * K_PAD + peers

    # Pass 1: the row's (or chunk's) log-sum-exps. A row that fits one tile is loaded once here
    # and kept for pass 2.
    if SINGLE_TILE:
        z = _load_tile(logits_ptr, offsets, cols, 0, C, live).to(ACC)
        zt, u = _scaled_tiles(z, peers, inv_t, K, MODE, HAS_T)
        m, s = _online_lse(neg_inf, zero, z)
        mt, st, mu, su, sum_z = m, s, m, s, zero
        if HAS_T:
            mt, st = _online_lse(neg_inf, zero, zt)
        if MODE == 2:
            mu, su = _online_lse(neg_inf, zero, u)
        if HAS_SMOOTHING:
            sum_z = tl.sum(tl.where(cols[None, :] < C, z, 0.0), axis=1)
        stats = (m, s, mt, st, mu, su, sum_z)
    elif STAGE <= 1:
        stats = _pass_1(
            logits_ptr,
            offsets,
            cols,
            c_lo,
            c_hi,
            C,
            live,
            peers,
            inv_t,
            stats,
            K,
            MODE,
            HAS_T,
            HAS_SMOOTHING,
            BLOCK_C,
        )
    if STAGE == 1:
        m, s, mt, st, mu, su, sum_z = stats
        base = stats_ptr + ((r * splits + part) * 7) * K_PAD + peers
        tl.store(base, m)
        tl.store(base + K_PAD, s)
        tl.store(base + 2 * K_PAD, mt)
        tl.store(base + 3 * K_PAD, st)
        tl.store(base + 4 * K_PAD, mu)
        tl.store(base + 5 * K_PAD, su)
        tl.store(base + 6 * K_PAD, sum_z)
    else:
        if STAGE >= 2:
            stats = _merge_partial_stats(stats_ptr, r, splits, peers, SPLITS_PAD, K_PAD)
        m, s, mt, st, mu, su, sum_z = stats
        lse = _finish_lse(m, s)
        lse_t = _finish_lse(mt, st) if HAS_T else lse
        lse_u = _finish_lse(mu, su) if MODE == 2 else lse

        # Mimicry weights: W[k, j] weighs KL(q_j || q_k); the uniform modes use closed forms and
        # read no weights.
        if MODE == 3:
            wk = peers[:, None] * K + peers[None, :]
            w_live = peer_live[:, None] & peer_live[None, :]
            weights = tl.load(weights_ptr + wk, mask=w_live, other=0.0).to(ACC)
        cross = zero  # sum_c t_k log q_k
        self_term = zero  # pairwise/weights: h_k = sum_c q_k log q_k; ensembles: sum t_k log t_k
        if STAGE == 3:
            cross = _merge_partial_sums(sums_ptr, r, splits, peers, 0, SPLITS_PAD, K_PAD)
            self_term = _merge_partial_sums(sums_ptr, r, splits, peers, 1, SPLITS_PAD, K_PAD)
        else:
            # Pass 2: probabilities, the loss sums and the gradient, tile by tile.
            row_sum = tl.sum(weights, axis=1) if MODE == 3 else zero + 1.0
            scale = _grad_scale(scale_ptr, peers, r, stride_scale_k, stride_scale_r, K, ACC)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                if not SINGLE_TILE:
                    z = _load_tile(logits_ptr, offsets, cols, c0, C, live).to(ACC)
                    zt, u = _scaled_tiles(z, peers, inv_t, K, MODE, HAS_T)
                cls = c0 + cols
                tile_live = live & (cls < C)[None, :]
                log_q = zt - lse_t[:, None]
                q = tl.where(tile_live, tl.exp(log_q), 0.0)
                if MODE == 2:
                    log_t = u - lse_u[:, None]
                    t = tl.where(tile_live, tl.exp(log_t), 0.0)
                    self_term += tl.sum(_p_log_q(t, log_t), axis=1)
                elif MODE == 3:
                    t = _weighted_targets(weights, q, K_PAD)
                    self_term += tl.sum(_p_log_q(q, log_q), axis=1)
                else:
                    t = (tl.sum(q, axis=0)[None, :] - q) / (K - 1)
                    if MODE == 1:
                        self_term += tl.sum(_p_log_q(t, tl.log(t)), axis=1)
                    else:
                        self_term += tl.sum(_p_log_q(q, log_q), axis=1)
                cross += tl.sum(_p_log_q(t, log_q), axis=1)
                if COMPUTE_GRAD:
                    p = tl.where(tile_live, tl.exp(z - lse[:, None]), 0.0) if HAS_T else q
                    grad = p - smoothing / C + alpha_t * (row_sum[:, None] * q - t)
                    grad -= tl.where(cls[None, :] == y_safe, 1.0 - smoothing, 0.0)
                    grad = _row_output(grad * scale[:, None], ignored, bad_target)
                    out_mask = peer_live[:, None] & (cls < C)[None, :]
                    grad_offsets = (peers.to(tl.int64)[:, None] * R + r) * C + cls[None, :]
                    grad = grad.to(grad_ptr.dtype.element_ty)
                    tl.store(grad_ptr + grad_offsets, grad, mask=out_mask)
        if STAGE == 2:
            tl.store(sums_ptr + sums_offsets, cross)
            tl.store(sums_ptr + sums_offsets + K_PAD, self_term)
        else:
            z_y = tl.load(logits_ptr + peer_offsets + y_safe, mask=live_peers, other=0.0)
            ce = lse - (1.0 - smoothing) * z_y.to(ACC)
            if HAS_SMOOTHING:
                ce -= smoothing / C * sum_z
            if MODE == 3:  # sum_j W[k, j] h_j - sum_c t_k log q_k
                mimicry = tl.sum(weights * self_term[None, :], axis=1) - cross
            elif MODE == 0:  # sum_{j != k} h_j / (K - 1) - sum_c t_k log q_k
                others = (peers[:, None] != peers[None, :]) & (peers[None, :] < K)
                h_others = tl.sum(tl.where(others, self_term[None, :], 0.0), axis=1)
                mimicry = h_others / (K - 1) - cross
            else:
                mimicry = self_term - cross
            loss = ce + (tl.cast(alpha_t2_hi, ACC) + tl.cast(alpha_t2_lo, ACC)) * mimicry
            out = peers.to(tl.int64) * R + r
            tl.store(ce_ptr + out, _row_output(ce, ignored, bad_target), mask=peer_live)
            tl.store(mimicry_ptr + out, _row_output(mimicry, ignored, bad_target), mask=peer_live)
            tl.store(loss_ptr + out, _row_output(loss, ignored, bad_target), mask=peer_live)


@triton.jit
def _merge_partial_sums(
    sums_ptr, r, splits, peers, which, SPLITS_PAD: tl.constexpr, K_PAD: tl.constexpr
):
    """A row's loss sum `which` (0: cross, 1: self term) over its splits, in a fixed order."""
    parts = tl.arange(0, SPLITS_PAD)
    offsets = ((r * splits + parts[:, None]) * 2 + which) * K_PAD + peers[None, :]
    live = (parts < splits)[:, None] & (peers < K_PAD)[None, :]
    return tl.sum(tl.load(sums_ptr + offsets, mask=live, other=0.0), axis=0)


@triton.jit(do_not_specialize=["R", "stride_gk", "stride_gr", "stride_sk", "stride_sr"])
def _scale_grad_rows_kernel(
    grad_ptr,
    grad_loss_ptr,
    scale_ptr,
    R,
    C,
    stride_gk,
    stride_gr,
    stride_sk,
    stride_sr,
    BLOCK: tl.constexpr,
):
    """grad[k, r] *= grad_loss[k, r] / s[k, r], s being the factor the forward folded in."""
    row = tl.program_id(0).to(tl.int64)
    k = row // R
    r = row - k * R
    g = tl.load(grad_loss_ptr + k * stride_gk + r * stride_gr)
    s = tl.load(scale_ptr + k * stride_sk + r * stride_sr)
    s = tl.where(s == 0, 1.0, s)
    if g != s:
        factor = g / s
        cols = tl.arange(0, BLOCK)
        for c0 in range(0, C, BLOCK):
            offsets = row * C + c0 + cols
            mask = c0 + cols < C
            x = tl.load(grad_ptr + offsets, mask=mask)
            tl.store(grad_ptr + offsets, (x.to(factor.dtype) * factor).to(x.dtype), mask=mask)


def _split(x: float) -> tuple[float, float]:
    """x as hi + lo, two float32 numbers: Triton passes Python floats as float32, and float64
    logits need their options to about 48 bits. (Symbolic floats under torch.compile pass as hi.)"""
    if not isinstance(x, float):
        return x, 0.0
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@dataclass(frozen=True)
class Launch:
    """One launch of `_mutual_loss_with_grad_kernel`: its grid, constexprs and warps."""

    grid: tuple[int, int]
    constexprs: dict
    num_warps: int


@dataclass(frozen=True)
class Plan:
    """How the op computes one problem: the launches, and the split of a row's classes."""

    chunk: int  # classes per program
    splits: int  # programs per row
    k_pad: int
    launches: tuple[Launch, ...]


def _tile(k_pad: int, num_classes: int, mode: str, acc: torch.dtype) -> tuple[int, int]:
    """(BLOCK_C, num_warps). The largest temporary ([K_PAD, BLOCK_C], or [K_PAD, K_PAD, BLOCK_C]
    for ensemble_logits and weights) stays within _MAX_TILE_BYTES, spread over the warps so that no
    thread holds more than _THREAD_ELEMENTS of its elements (up to 8 warps): registers, not
    spills. Tiles grow by 4x from 128 classes, so that few sizes are ever compiled."""
    rows = k_pad * (k_pad if MODE_IDS[mode] >= 2 else 1)
    budget = max(_MAX_TILE_BYTES // (rows * acc.itemsize), 16)  # a power of 2, as all terms are
    block_c = 128
    while block_c < min(num_classes, budget):
        block_c *= 4
    block_c = min(block_c, budget)
    return block_c, min(max(rows * block_c // (32 * _THREAD_ELEMENTS), 1), 8)


def plan(
    k: int,
    rows: int,
    num_classes: int,
    dtype: torch.dtype,
    mode: str,
    has_t: bool,
    has_smoothing: bool,
    compute_grad: bool,
) -> Plan:
    """The launches of the op for logits [k, rows, num_classes] of `dtype`: the one place that
    decides block sizes, warps and splits (the op launches them; the compile check enumerates them).

    A row's classes are split across programs when there are too few rows to fill the GPU and each
    chunk keeps at least SPLIT_MIN_CLASSES: three launches, merged in a fixed order.
    """
    acc = accumulation_dtype(dtype)
    k_pad = triton.next_power_of_2(k)
    block_c, num_warps = _tile(k_pad, num_classes, mode, acc)
    splits = min(triton.cdiv(SPLIT_PROGRAMS, max(rows, 1)), num_classes // SPLIT_MIN_CLASSES)
    chunk = num_classes
    if splits > 1:
        chunk = triton.cdiv(triton.cdiv(num_classes, splits), block_c) * block_c
        splits = triton.cdiv(num_classes, chunk)
    else:
        splits = 1
    common = dict(
        K_PAD=k_pad,
        BLOCK_C=block_c,
        SPLITS_PAD=triton.next_power_of_2(splits),
        MODE=MODE_IDS[mode],
        HAS_T=has_t,
        HAS_SMOOTHING=has_smoothing,
        COMPUTE_GRAD=compute_grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )
    if splits == 1:
        stages = [((rows, 1), 0, num_classes <= block_c)]
    else:
        stages = [((rows, splits), 1, False), ((rows, splits), 2, False), ((rows, 1), 3, False)]
    launches = tuple(
        Launch(grid, dict(common, STAGE=stage, SINGLE_TILE=single), num_warps)
        for grid, stage, single in stages
    )
    return Plan(chunk, splits, k_pad, launches)


def check_peers(k: int) -> None:
    if k > MAX_PEERS:
        raise ValueError(
            f"backend='triton' supports up to {MAX_PEERS} peers, got K = {k}; "
            "use backend='cuda' (or 'auto')"
        )


def kernel_launches(
    logits: Tensor,
    target: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    mode: str,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], list[tuple[Launch, tuple]]]:
    """The op's outputs (allocated, not yet written) and the launches that compute them, each
    with its arguments. Shared by the op and the compile check (benchmarks/triton_compile.py),
    which calls it with meta tensors to compile exactly what the op launches."""
    k, rows, num_classes = logits.shape
    check_peers(k)
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    if mode == "weights":
        weights = weights.contiguous()
    acc = accumulation_dtype(logits.dtype)
    loss = torch.empty((k, rows), dtype=acc, device=logits.device)
    ce, mimicry = torch.empty_like(loss), torch.empty_like(loss)
    grad_shape = logits.shape if compute_grad else (0,)
    grad = torch.empty(grad_shape, dtype=logits.dtype, device=logits.device)
    outputs = (loss, ce, mimicry, grad)
    if rows == 0:
        return outputs, []
    has_t, has_smoothing = temperature != 1.0, label_smoothing != 0.0
    work = plan(k, rows, num_classes, logits.dtype, mode, has_t, has_smoothing, compute_grad)
    partial = (rows, work.splits, 7, work.k_pad) if work.splits > 1 else (0,)
    stats = loss.new_empty(partial)
    sums = loss.new_empty((rows, work.splits, 2, work.k_pad) if work.splits > 1 else (0,))
    scale = row_scale.expand(k, rows)
    arguments = (
        logits,
        target,
        weights,
        scale,
        loss,
        ce,
        mimicry,
        grad,
        stats,
        sums,
        rows,
        num_classes,
        logits.stride(0),
        logits.stride(1),
        scale.stride(0),
        scale.stride(1),
        work.chunk,
        work.splits,
        k,
        *_split(1.0 / temperature),
        *_split(alpha * temperature),
        *_split(alpha * temperature**2),
        *_split(label_smoothing),
        ignore_index,
    )
    return outputs, [(launch, arguments) for launch in work.launches]


def scale_launch(grad: Tensor, grad_loss: Tensor, row_scale: Tensor) -> tuple[Launch, tuple]:
    """The launch of `_scale_grad_rows_kernel` and its arguments."""
    k, rows, num_classes = grad.shape
    block = min(triton.next_power_of_2(num_classes), _SCALE_BLOCK)
    scale = row_scale.expand(k, rows)
    arguments = (
        grad,
        grad_loss,
        scale,
        rows,
        num_classes,
        grad_loss.stride(0),
        grad_loss.stride(1),
        scale.stride(0),
        scale.stride(1),
    )
    return Launch((k * rows, 1), dict(BLOCK=block), num_warps=4), arguments


# Under TRITON_INTERPRET=1 (CPU tensors, for tests) the kernels are plain Python, invisible to
# torch.compile's tracing: the ops are then opaque custom ops, with the fake kernels below.
INTERPRETED = isinstance(_scale_grad_rows_kernel, InterpretedFunction)
_define_op = custom_op if INTERPRETED else triton_op


@_define_op("fastdml::triton_mutual_loss_with_grad", mutates_args=())
def mutual_loss_with_grad(
    logits: Tensor,
    target: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    mode: str,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outputs, launches = kernel_launches(
        logits,
        target,
        weights,
        row_scale,
        mode,
        temperature,
        alpha,
        label_smoothing,
        ignore_index,
        compute_grad,
    )
    for launch, arguments in launches:
        wrap_triton(_mutual_loss_with_grad_kernel)[launch.grid](
            *arguments, num_warps=launch.num_warps, **launch.constexprs
        )
    return outputs


@_define_op("fastdml::triton_scale_grad_rows_", mutates_args={"grad"})
def scale_grad_rows_(grad: Tensor, grad_loss: Tensor, row_scale: Tensor) -> None:
    if grad.shape[0] * grad.shape[1] > 0:
        launch, arguments = scale_launch(grad, grad_loss, row_scale)
        wrap_triton(_scale_grad_rows_kernel)[launch.grid](
            *arguments, num_warps=launch.num_warps, **launch.constexprs
        )


def _with_grad_fake(logits, target, weights, row_scale, *options):
    k, rows, _ = logits.shape
    loss = logits.new_empty((k, rows), dtype=accumulation_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape if options[-1] else (0,))
    return loss, torch.empty_like(loss), torch.empty_like(loss), grad


def _with_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:9]
    # The gradient buffer belongs to the op (the caller's logits are never written): the first
    # backward rescales it in place and hands it to autograd, so it is kept out of
    # save_for_backward's version checks. (A non-differentiable output holds no reference to
    # this node, so keeping it on ctx makes no reference cycle.)
    ctx.grad_buffer = output[3]
    ctx.mark_non_differentiable(*output[1:])
    # No zero-filled gradients for the outputs nothing differentiates (the gradient buffer is the
    # size of the logits: autograd would allocate and fill a copy of it in every backward).
    ctx.set_materialize_grads(False)


def _with_grad_backward(ctx, grad_loss, _grad_ce, _grad_mimicry, _grad_grad):
    """The backward of `triton_mutual_loss_with_grad`: its forward's gradient, rescaled as needed.

    Where the forward wrote no gradient (float16, or a later backward through a retained graph,
    as with retain_graph=True or gradcheck, which finds the buffer handed out already), the op
    computes it again with the upstream gradient as the row scale, so it is exact in the logits'
    dtype; the rescale then only zeroes the rows whose upstream gradient is 0 (a zero scale folds
    nothing in).
    """
    if grad_loss is None:
        return (None,) * 10
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused GPU ops of fastdml have no double backward (create_graph=True); "
            "use backend='torch' for higher-order gradients"
        )
    logits, target, weights, row_scale = ctx.saved_tensors
    grad, ctx.grad_buffer = ctx.grad_buffer, None
    if grad is None or grad.shape != logits.shape:
        row_scale = grad_loss
        grad = mutual_loss_with_grad(logits, target, weights, row_scale, *ctx.options, True)[3]
    scale_grad_rows_(grad, grad_loss, row_scale)
    return (grad,) + (None,) * 9


if INTERPRETED:
    mutual_loss_with_grad.register_fake(_with_grad_fake)
    scale_grad_rows_.register_fake(lambda grad, *_: None)
mutual_loss_with_grad.register_autograd(_with_grad_backward, setup_context=_with_grad_setup_context)
