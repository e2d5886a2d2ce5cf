"""Triton kernels of the mutual loss, as the custom ops `fastdml::triton_fused_mutual_loss` and
`fastdml::triton_scale_grad_`. They take the arguments of the C++ ops `fastdml::fused_mutual_loss`
and `fastdml::scale_grad_` (csrc/ops.cpp) and keep their contract, so that both GPU backends share
one Python path (fastdml/loss/ops.py): the forward counts the rows and reduces the loss on the
device, in an order fixed by the shape and the device, returns each peer's terms reduced, and
writes the gradient of sum(grad_scale * loss); the backward rescales that gradient in place and
returns at once where the upstream gradient is 1.

The kernel plan (docs/design.md, "The kernel plan"): a persistent grid of programs, each taking
rows pid, pid + programs, ... A row's K peers are K separate [LANES, VEC] tiles, LANES vectors of
VEC classes, one vector of every peer a thread: the sums over the peers of a class stay in
registers. Pass 1 folds the tiles into per-lane (max, sum of exponentials); pass 2 reads the row
again, last tile first (what pass 1 read last is the likeliest still in L2), adds the loss sums
per element and writes the gradient. Each pass ends with one cross-thread reduction per value. A
row that fits one tile is read once. When rows are too few to fill the GPU, a row's classes are
split over programs: three launches, merged in a fixed order. The divergences other than KL
(reverse KL, JSD) read the row a third time to write the gradient, which needs the row's sum
<q, d> from pass 2 (docs/design.md, "Other divergences"): a fourth launch for a split row. Every
option of the loss family is a constexpr, so that the paper's loss compiles to the same loops.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op
from triton.runtime.interpreter import InterpretedFunction

from fastdml.loss.arguments import accumulation_dtype
from fastdml.loss.ops import RECOMPUTE_GRAD_DTYPES, fused_fake

MODE_IDS = {"pairwise": 0, "ensemble": 1, "ensemble_logits": 2, "weights": 3}
DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTION_IDS = {"none": 0, "sum": 1, "mean": 2}
# A row's per-peer values live in registers, K of each: beyond 16 peers, the CUDA op. (float64,
# two registers a value, spills in the loops from 9 peers: slower, not wrong.)
MAX_PEERS = 16
# A thread's vectors: at most this many 32-bit registers for one value of each of the K peers'
# classes of a tile (a float64 takes two), and 16 bytes a vector at most (the widest access), so
# that the values of a tile stay in registers.
_PEER_REGISTERS = 16
_VECTOR_BYTES = 16


# The most warps of a program, and the registers a thread may take with up to 4 peers in 32-bit
# accumulation: as the CUDA op, 128, so that 16 warps are resident on a multiprocessor (more
# peers, or float64: 255, 8 warps). The persistent grid is as many programs as are resident.
# FASTDML_TRITON_TILE=WARPS,REGISTERS overrides them (benchmarks/gpu_tune.py measures choices).
def _tile_setting(text: str) -> tuple[int, int]:
    """FASTDML_TRITON_TILE's (warps, registers), checked."""
    fields = text.split(",")
    if len(fields) == 2 and all(field.strip().isdigit() for field in fields):
        warps, registers = map(int, fields)
        if 0 < warps <= 32 and warps & (warps - 1) == 0 and 24 <= registers <= 255:
            return warps, registers
    raise ValueError(
        "FASTDML_TRITON_TILE must be WARPS,REGISTERS: the most warps of a program (a power of 2 "
        f"up to 32) and the registers of a thread (24 to 255), got {text!r}"
    )


_MAX_WARPS, _REGISTERS = _tile_setting(os.environ.get("FASTDML_TRITON_TILE", "4,128"))
# From which a thread takes 255 registers (with float64 always; with the JSD, whose pass 2 keeps
# a logarithm per pair of peers, from _MANY_JSD_PEERS).
_MANY_PEERS = 5
_MANY_JSD_PEERS = 3
SPLIT_PROGRAMS = 512  # rows fewer than this split their classes across programs...
SPLIT_MIN_CLASSES = 16384  # ...into chunks of at least this many classes
# The per-class loops work in base 2 (docs/design.md, "Exponentials in base 2"): a natural
# logarithm times _LOG2E is in their units, and log q is clamped at _LOWEST in q log q, below any
# finite log-probability of float32 or float64.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_LOWEST = tl.constexpr(-3.4028234663852886e38)
_COUNT_BLOCK = tl.constexpr(1024)  # targets a program reads at once to count a mean's rows
_PARTS_BLOCK = tl.constexpr(256)  # programs' partial sums the last program adds at once
# A split row's chunk: per peer, its (max, sum, sum at 1 / T, max and sum of u), and loss sums.
_STAT_FIELDS = tl.constexpr(5)
_SUM_FIELDS = tl.constexpr(3)


@triton.jit
def _exp2(x):
    """2^x. In float32, ex2.approx.ftz: one MUFU instruction, within 2 ulp, subnormal results
    flushed to 0 (tl.exp2 wraps the non-ftz one in a range fix-up). Its argument is always a
    max-shifted difference formed first, (z - max) * log2(e), never z * log2(e) - max * log2(e),
    which would lose the precision of z - max on peaked rows. float64's is exact, and so is the
    interpreter's, which runs no PTX."""
    if _PTX and x.dtype == tl.float32:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x):
    """log2 x. In float32, lg2.approx: one MUFU instruction, within about 2^-22
    (tl.log2 is a library polynomial); subnormal inputs are kept, not flushed (a mixture of tiny
    probabilities stays > 0), and log2 0 = -inf. float64's is exact, and so is the
    interpreter's."""
    if _PTX and x.dtype == tl.float32:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _sum_others(xs, K: tl.constexpr):
    """Per peer k, sum_{j != k} xs[j] as a prefix plus a suffix sum, never total - own (NaN at
    -inf, and it cancels where peer k dominates). The partial sums are shared by all k: about
    two additions a peer."""
    prefixes = (xs[0],)  # prefixes[i] = xs[0] + ... + xs[i]
    suffixes = (xs[K - 1],)  # suffixes[i] = xs[K - 1 - i] + ... + xs[K - 1]
    for i in tl.static_range(1, K - 1):
        prefixes = prefixes + (prefixes[i - 1] + xs[i],)
        suffixes = suffixes + (suffixes[i - 1] + xs[K - 1 - i],)
    others = (suffixes[K - 2],)
    for k in tl.static_range(1, K - 1):
        others = others + (prefixes[k - 1] + suffixes[K - 2 - k],)
    return others + (prefixes[K - 2],)


@triton.jit
def _load_peers(ptr, rows, v0, lanes, cols, CV, MASKED: tl.constexpr, POLICY: tl.constexpr,
                K: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The K peers' [LANES, VEC] tiles of vectors v0 + lanes, in ACC (rows: the offset of peer
    0's row and the peers' stride, in elements). MASKED: vectors from CV on are -inf, which every
    sum takes as absent."""
    zs = ()
    for k in tl.static_range(K):
        at = ptr + rows[0] + k * rows[1] + v0 * VEC + cols
        if MASKED:
            live = (v0 + lanes < CV)[:, None]
            z = tl.load(at, mask=live, other=float("-inf"), eviction_policy=POLICY)
        else:
            z = tl.load(at, eviction_policy=POLICY)
        zs = zs + (z.to(ACC),)
    return zs


@triton.jit
def _fold_lse(m, s, st, x, a_t, HAS_T: tl.constexpr):
    """Folds a [LANES, VEC] tile into per-lane running (max m, s = sum 2^((x - m) log2(e)),
    st = sum 2^((x - m) a_t)), one rescale a vector. Only -inf so far shifts by 0 instead, so that
    no (-inf) - (-inf) is formed: every exponential is then 0."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = x - shift[:, None]
    dm = m - shift  # -inf on the first fold: the old sums (0) get weight 0
    s = s * _exp2(dm * _LOG2E) + tl.sum(_exp2(d * _LOG2E), axis=1)
    if HAS_T:
        st = st * _exp2(dm * a_t) + tl.sum(_exp2(d * a_t), axis=1)
    return m_new, s, st


@triton.jit
def _fold_tile(stats, zs, a_t, u_scale, K: tl.constexpr, MODE: tl.constexpr,
               HAS_T: tl.constexpr):  # fmt: skip
    """Pass 1 on one tile: each peer's (m, s, st) of its logits and, for ensemble_logits,
    (mu, su) of u, the others' mean logits over T."""
    if MODE == 2:
        us = _sum_others(zs, K)
    folded = ()
    for k in tl.static_range(K):
        m, s, st, mu, su = stats[k]
        m, s, st = _fold_lse(m, s, st, zs[k], a_t, HAS_T)
        if MODE == 2:
            mu, su, _ = _fold_lse(mu, su, su, us[k] * u_scale, a_t, False)
        folded = folded + ((m, s, st, mu, su),)
    return folded


@triton.jit
def _merge_lse(m, s, st, a_t, HAS_T: tl.constexpr):
    """Several (m, s, st) merged into one, the lanes' of a row (or the chunks' of a split row)."""
    row_m = tl.max(m)
    shift = tl.where(row_m == float("-inf"), 0.0, row_m)
    row_s = tl.sum(s * _exp2((m - shift) * _LOG2E))
    row_st = tl.sum(st * _exp2((m - shift) * a_t)) if HAS_T else row_s
    return row_m, row_s, row_st


@triton.jit
def _lanes_stats(stats, a_t, K: tl.constexpr, MODE: tl.constexpr, HAS_T: tl.constexpr):
    """Per peer, the (m, s, st, mu, su) of pass 1 merged across the lanes."""
    reduced = ()
    for k in tl.static_range(K):
        m, s, st, mu, su = stats[k]
        row_m, row_s, row_st = _merge_lse(m, s, st, a_t, HAS_T)
        row_mu, row_su = row_m, row_s
        if MODE == 2:
            row_mu, row_su, _ = _merge_lse(mu, su, su, a_t, False)
        reduced = reduced + ((row_m, row_s, row_st, row_mu, row_su),)
    return reduced


@triton.jit
def _peer_rows(stats, K: tl.constexpr, HAS_T: tl.constexpr):
    """Per peer, what pass 2 and the cross-entropy need of its row statistics, in base 2:
    log2 q = (z - m) a_t - b, log2 p = (z - m) log2(e) - bs, log2 t = (u - mu) log2(e) - bu
    (ensemble_logits); and ls = log sum exp(z - m), natural."""
    rows = ()
    for k in tl.static_range(K):
        m, s, st, mu, su = stats[k]
        bs = tl.log2(s)
        b = tl.log2(st) if HAS_T else bs
        rows = rows + ((m, b, bs, mu, tl.log2(su), tl.log(s)),)
    return rows


@triton.jit
def _store_grad(grad_ptr, g_rows, v0, lanes, cols, CV, gs, MASKED: tl.constexpr,
                K: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    for k in tl.static_range(K):
        at = grad_ptr + g_rows[0] + k * g_rows[1] + v0 * VEC + cols
        g = gs[k].to(grad_ptr.dtype.element_ty)
        if MASKED:
            tl.store(at, g, mask=(v0 + lanes < CV)[:, None], eviction_policy="evict_first")
        else:
            tl.store(at, g, eviction_policy="evict_first")


@triton.jit
def _targets(qs, zs, rows, weights, u_scale, inv_km1, K: tl.constexpr, MODE: tl.constexpr):
    """Per peer, its target t (pairwise: the others' sum, inv_km1 left out) and, in the modes
    of one target, log2 t (else unused)."""
    if MODE == 0:
        ts = _sum_others(qs, K)  # unscaled: inv_km1 is folded into coefs and the loss
        lts = ts
    elif MODE == 1:
        others = _sum_others(qs, K)
        ts = ()
        lts = ()
        for k in tl.static_range(K):
            ts = ts + (others[k] * inv_km1,)
            lts = lts + (_log2(ts[k]),)
    elif MODE == 2:
        us = _sum_others(zs, K)
        lts = ()
        ts = ()
        for k in tl.static_range(K):
            lt = (us[k] * u_scale - rows[k][3]) * _LOG2E - rows[k][4]
            lts = lts + (lt,)
            ts = ts + (_exp2(lt),)
    else:
        ts = ()
        for k in tl.static_range(K):
            t = tl.zeros_like(qs[k])
            for j in tl.static_range(K):
                if j != k:
                    t += weights[k][j] * qs[j]
            ts = ts + (t,)
        lts = ts
    return ts, lts


@triton.jit
def _own_weight(weights, k: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr):
    """w_k = sum_{j != k} W[k, j], the weight of peer k's own q in its mimicry: 1 but with peer
    weights."""
    w = 1.0
    if MODE == 3:
        w = 0.0
        for j in tl.static_range(K):
            if j != k:
                w += weights[k][j]
    return w


@triton.jit
def _log2_1p(r):
    """log2(1 + r) to the precision of r, for r in [-1/2, 1] (Goldberg's: the rounding of 1 + r
    cancels in r / (u - 1)); with the library log2, not lg2.approx, whose absolute error would
    swamp a logarithm near 0."""
    u = 1.0 + r
    return tl.where(u == 1.0, r * _LOG2E, tl.log2(u) * (r / (u - 1.0)))


@triton.jit
def _jsd_logs(t, lt, q, lq, beta, one_minus_beta, log2_beta, log2_one_minus_beta):
    """(log2 m - log2 t, log2 m - log2 q) of the mixture m = beta t + (1 - beta) q, per class
    from its larger term b and the smaller s: log2 m = log2 b + log2(1 + s / b), s / b <= 1, so
    that neither difference loses the digits near beta = 0 or 1 that log2 m - log2 q would, and
    no ratio overflows (docs/design.md, Other divergences). -inf where m = 0."""
    bt = beta * t
    oq = one_minus_beta * q
    t_larger = bt >= oq
    larger = tl.maximum(bt, oq)
    l1p = tl.where(larger == 0, float("-inf"), _log2_1p(tl.minimum(bt, oq) / larger))
    from_t = log2_beta + l1p
    from_q = log2_one_minus_beta + l1p
    ratio = lt - lq  # log2 t - log2 q
    rel_t = tl.where(t_larger, from_t, from_q - ratio)
    rel_q = tl.where(t_larger, from_t + ratio, from_q)
    return rel_t, rel_q


@triton.jit
def _divergence_terms(qs, ls, ts, lts, weights, inv_km1, beta, one_minus_beta,
                      K: tl.constexpr, MODE: tl.constexpr, DIVERGENCE: tl.constexpr):  # fmt: skip
    """Per peer, for the divergences other than KL (docs/design.md, Other divergences), in base 2:
    e = q * d with d = w log q - L, L the log-target mix (0 where q = 0), and for the JSD the
    targets' terms of their KL to the mixtures (pairwise: without inv_km1; else unused).
    Reverse KL: L = sum_j W[k, j] log q_j, or log t of the one target. JSD: d = -sum_j W[k, j]
    (log m_kj - log q_k), m_kj = beta q_j + (1 - beta) q_k, a logarithm per pair, or that of the
    one target's m."""
    if DIVERGENCE == 2:  # log2 beta and log2(1 - beta), each from the smaller of the two
        log2_beta = tl.where(beta < 0.5, tl.log2(beta), _log2_1p(-one_minus_beta))
        log2_one_minus_beta = tl.where(beta < 0.5, _log2_1p(-beta), tl.log2(one_minus_beta))
    es = ()
    kts = ()
    for k in tl.static_range(K):
        q = qs[k]
        kt = tl.zeros_like(q)
        if MODE == 1 or MODE == 2:
            if DIVERGENCE == 1:
                d = ls[k] - lts[k]
            else:
                rel_t, rel_q = _jsd_logs(
                    ts[k], lts[k], q, ls[k], beta, one_minus_beta, log2_beta, log2_one_minus_beta
                )
                kt = tl.where(ts[k] == 0, 0.0, -ts[k] * rel_t)
                d = -rel_q
        else:
            mix = tl.zeros_like(q)
            for j in tl.static_range(K):
                if j != k:
                    if DIVERGENCE == 1:
                        term = ls[j]
                        if MODE == 3:  # 0 log 0 of a peer not imitated, never 0 * -inf
                            term = tl.where(weights[k][j] == 0, 0.0, weights[k][j] * term)
                    else:
                        rel_t, term = _jsd_logs(
                            qs[j], ls[j], q, ls[k], beta, one_minus_beta, log2_beta,
                            log2_one_minus_beta,
                        )  # fmt: skip
                        kl_j = tl.where(qs[j] == 0, 0.0, -qs[j] * rel_t)
                        if MODE == 3:  # a peer not imitated adds nothing, never 0 * -inf
                            term = tl.where(weights[k][j] == 0, 0.0, weights[k][j] * term)
                            kl_j = weights[k][j] * kl_j
                        kt += kl_j
                    mix += term
            if DIVERGENCE == 2:  # mix: sum_j W[k, j] (log m_kj - log q_k)
                d = -mix * inv_km1 if MODE == 0 else -mix
            elif MODE == 0:
                d = ls[k] - mix * inv_km1
            else:
                d = _own_weight(weights, k, K, MODE) * ls[k] - mix
        es = es + (tl.where(q == 0, 0.0, q * d),)
        kts = kts + (kt,)
    return es, kts


@triton.jit
def _emit_tile(sums, zs, rows, coefs, weights, a_t, u_scale, inv_km1, beta, one_minus_beta,
               label, v0, lanes, cols, CV, grad_ptr, g_rows, MASKED: tl.constexpr,
               K: tl.constexpr, VEC: tl.constexpr, MODE: tl.constexpr, HAS_T: tl.constexpr,
               HAS_SMOOTHING: tl.constexpr, CE: tl.constexpr, DIVERGENCE: tl.constexpr,
               COMPUTE_GRAD: tl.constexpr):  # fmt: skip
    """Pass 2 on one tile: every peer's q, its mimicry target t and the loss sums, per element in
    units (docs/design.md, "The loss"), and the gradient. With KL, sums[k] is (sum q log q,
    sum t log q) in pairwise and weights modes, (the KL, unused) in the ensemble ones; with the
    other divergences (sum q d, the JSD's targets' terms); then sum (z - m) for label smoothing.
    log q is clamped at the lowest finite value in q log q, so that 0 log 0 adds 0 and one FMA
    adds a term; t log q is taken as 0 where t = 0, and as -inf where q = 0 < t (the KL is
    infinite). The gradient's mimicry part is c_q q + c_t t with KL, c_q q + c_t q d with the
    others (pass 3: the row's sum q d is in c_q)."""
    label = tl.cast(label, tl.int32)  # the label's offset from the tile, within (-C, C)
    ds = ()
    ls = ()
    qs = ()
    for k in tl.static_range(K):
        d = zs[k] - rows[k][0]
        ds = ds + (d,)
        ls = ls + (d * a_t - rows[k][1],)
        qs = qs + (_exp2(ls[k]),)
    ts, lts = _targets(qs, zs, rows, weights, u_scale, inv_km1, K, MODE)
    if DIVERGENCE != 0:
        ts, kts = _divergence_terms(qs, ls, ts, lts, weights, inv_km1, beta,
                                    one_minus_beta, K, MODE, DIVERGENCE)  # fmt: skip
    added = ()
    gs = ()
    for k in tl.static_range(K):
        s0, s1, s2 = sums[k]
        q, t, lq = qs[k], ts[k], ls[k]
        if DIVERGENCE != 0:
            s0 += t
            s1 += kts[k]
        elif MODE == 0 or MODE == 3:
            s0 += q * tl.maximum(lq, _LOWEST, propagate_nan=tl.PropagateNan.ALL)
            s1 += t * tl.where(t == 0, 0.0, lq)
        else:
            s0 += tl.where(t == 0, 0.0, t * (lts[k] - lq))
        if HAS_SMOOTHING:
            s2 += tl.where((v0 + lanes < CV)[:, None], ds[k], 0.0) if MASKED else ds[k]
        added = added + ((s0, s1, s2),)
        if COMPUTE_GRAD:
            c_q, c_t, c_p, on, off = coefs[k]
            x = c_t * t
            if CE != 0:
                # The label's term joins before the cast to a narrower dtype (p - 1 cancels at
                # p ~ 1).
                x += tl.where(cols == label, on, off)
            g = c_q * q + x
            if HAS_T and CE != 0:
                g += c_p * _exp2(ds[k] * _LOG2E - rows[k][2])
            gs = gs + (g,)
    if COMPUTE_GRAD:
        _store_grad(grad_ptr, g_rows, v0, lanes, cols, CV, gs, MASKED, K, VEC)
    return added


@triton.jit
def _grad_coefs(scale_ptr, stride_scale_k, stride_scale_r, r, factor, ce_relative, sums, weights,
                alpha_t, inv_km1, smoothing, one_minus_beta, C, K: tl.constexpr,
                MODE: tl.constexpr, HAS_T: tl.constexpr, DIVERGENCE: tl.constexpr,
                SCALE: tl.constexpr):  # fmt: skip
    """Per peer, the gradient's coefficients in row r: s (c (p - (1 - eps) onehot - eps / C) +
    alpha T m) is c_q q + c_t x (+ c_p p) plus `on` at the label and `off` elsewhere, s being
    grad_scale (SCALE 0: none, 1: one value, 2: [K, R]) times `factor`, the mimicry's row
    weight, c the cross-entropy's weight relative to it (ce_relative) and m the mimicry's
    gradient: with KL w_k q - t (x = t), with the others q (d - <q, d>) times 1 or 1 - beta
    (x = q d; pass 3, after the row's sums). With T = 1, p = q and c_q holds c_p; pairwise's
    1 / (K - 1) is in c_t, not in t."""
    if SCALE == 1:
        one = tl.load(scale_ptr).to(factor.dtype) * factor
    coefs = ()
    for k in tl.static_range(K):
        if SCALE == 2:
            s = tl.load(scale_ptr + k * stride_scale_k + r * stride_scale_r) * factor
        elif SCALE == 1:
            s = one
        else:
            s = factor
        s_ce = s * ce_relative
        if DIVERGENCE == 0:
            w = _own_weight(weights, k, K, MODE)
            c_q = s * (alpha_t * w + (0.0 if HAS_T else ce_relative))
            c_t = -s * alpha_t * (inv_km1 if MODE == 0 else 1.0)
        else:  # d and <q, d> in base 2
            c_t = s * alpha_t * (_LN2 * (one_minus_beta if DIVERGENCE == 2 else 1.0))
            c_q = -c_t * sums[k][0] + (0.0 if HAS_T else s_ce)
        off = -s_ce * smoothing / C
        coefs = coefs + ((c_q, c_t, s_ce, off - s_ce * (1.0 - smoothing), off),)
    return coefs


@triton.jit
def _lanes_sums(sums, K: tl.constexpr, MODE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                DIVERGENCE: tl.constexpr):  # fmt: skip
    """Per peer, the loss sums of pass 2 added across the lanes (those the loss uses)."""
    zero = tl.zeros([], sums[0][0].dtype)
    reduced = ()
    for k in tl.static_range(K):
        s0, s1, s2 = sums[k]
        if DIVERGENCE == 2 or (DIVERGENCE == 0 and (MODE == 0 or MODE == 3)):
            s1 = tl.sum(s1)
        else:
            s1 = zero
        reduced = reduced + ((tl.sum(s0), s1, tl.sum(s2) if HAS_SMOOTHING else zero),)
    return reduced


@triton.jit
def _row_terms(rows, sums, z_label, labeled, weights, inv_km1, smoothing, beta, one_minus_beta,
               C, K: tl.constexpr, MODE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
               CE: tl.constexpr, MIMIC_UNLABELED: tl.constexpr,
               DIVERGENCE: tl.constexpr):  # fmt: skip
    """Per peer, the row's (cross-entropy, mimicry) from its statistics and loss sums; the
    cross-entropy 0 where the row has no label or the loss none."""
    terms = ()
    for k in tl.static_range(K):
        m, ls = rows[k][0], rows[k][5]
        ce = tl.zeros([], m.dtype)
        if CE != 0:
            ce = (1.0 - smoothing) * ((m - z_label[k]) + ls)
            # Skipped without smoothing, so that -inf logits of other classes keep the loss
            # finite.
            if HAS_SMOOTHING:
                ce += smoothing * (ls - sums[k][2] / C)
            if MIMIC_UNLABELED:
                ce = tl.where(labeled, ce, 0.0)
        mimicry = sums[k][0]
        if DIVERGENCE == 2:  # beta sum_j W[k, j] KL(t_j || m_kj) + (1 - beta) <q_k, d_k>
            kl_targets = sums[k][1] * (inv_km1 if MODE == 0 else 1.0)
            mimicry = beta * kl_targets + one_minus_beta * mimicry
        elif DIVERGENCE == 0 and (MODE == 0 or MODE == 3):  # sum_j W[k, j] h_j - sum_c t log q
            mimicry = -sums[k][1] * (inv_km1 if MODE == 0 else 1.0)
            for j in tl.static_range(K):
                if j != k:
                    mimicry += (inv_km1 if MODE == 0 else weights[k][j]) * sums[j][0]
        terms = terms + ((ce, mimicry * _LN2),)
    return terms


@triton.jit
def _fill_grad(grad_ptr, g_rows, v_lo, v_hi, value, lanes, cols, K: tl.constexpr,
               VEC: tl.constexpr, LANES: tl.constexpr):  # fmt: skip
    """Vectors [v_lo, v_hi) of a row that reads no logits: 0 where ignored, NaN where its target
    is out of range."""
    tile = tl.zeros([LANES, VEC], value.dtype) + value
    gs = ()
    for _ in tl.static_range(K):
        gs = gs + (tile,)
    for v0 in range(v_lo, v_hi, LANES):
        _store_grad(grad_ptr, g_rows, v0, lanes, cols, v_hi, gs, True, K, VEC)


@triton.jit
def _row_weights(target_ptr, normalizer_ptr, R, ignore_index, REDUCTION: tl.constexpr,
                 MIMIC_UNLABELED: tl.constexpr, NORMALIZER: tl.constexpr,
                 ACC: tl.constexpr):  # fmt: skip
    """The weights of a row's cross-entropy and of its mimicry in the reduced loss: 1 but for the
    mean, where both are 1 / normalizer (NaN unless it is > 0: a device value, never read on the
    host), or 1 / the rows each term covers, at least 1: those whose target is not ignore_index,
    and with MIMIC_UNLABELED all rows for the mimicry. Every program counts for itself, so that
    nothing runs before the forward; the targets come from L2."""
    ce = tl.full([], 1.0, ACC)
    mimicry = ce
    if REDUCTION == 2:
        if NORMALIZER:
            n = tl.load(normalizer_ptr).to(ACC)
            ce = tl.where(n > 0, 1.0 / n, float("nan"))
            mimicry = ce
        else:
            offsets = tl.arange(0, _COUNT_BLOCK)
            counted = tl.zeros([_COUNT_BLOCK], tl.int32)
            for r0 in range(0, R, _COUNT_BLOCK):
                y = tl.load(target_ptr + r0 + offsets, mask=r0 + offsets < R, other=ignore_index)
                counted += (y != ignore_index).to(tl.int32)
            ce = 1.0 / tl.maximum(tl.sum(counted), 1).to(ACC)
            mimicry = 1.0 / tl.cast(R, ACC) if MIMIC_UNLABELED else ce
    return ce, mimicry


@triton.jit
def _weighted_ce(ce, ce_weight, CE: tl.constexpr):
    """ce_weight times a cross-entropy term; no multiply where ce_weight is 1 (CE)."""
    return ce if CE == 1 else ce_weight * ce


@triton.jit
def _reduce_programs(terms, partial_ptr, ticket_ptr, loss_ptr, ce_ptr, mimicry_ptr, weights,
                     ce_weight, alpha_t2, K: tl.constexpr, CE: tl.constexpr):  # fmt: skip
    """Reductions "sum" and "mean" without a host sync or another launch: each program stores its
    rows' sums, (cross-entropy, mimicry) per peer; the last program to take a ticket adds them,
    program by program in blocks of a fixed order, times their row weights (`weights`), writes
    the outputs and leaves the ticket at 0 for the next forward."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for k in tl.static_range(K):
        tl.store(partial_ptr + (2 * k) * programs + pid, terms[k][0])
        tl.store(partial_ptr + (2 * k + 1) * programs + pid, terms[k][1])
    tl.debug_barrier()  # every thread's stores come before the ticket ...
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == programs - 1:  # ... whose acquire sees all
        parts = tl.arange(0, _PARTS_BLOCK)
        loss = tl.zeros([], alpha_t2.dtype)
        for k in tl.static_range(K):
            reduced = ()
            for i in tl.static_range(2):
                total = tl.zeros([_PARTS_BLOCK], alpha_t2.dtype)
                for p0 in range(0, programs, _PARTS_BLOCK):
                    at = partial_ptr + (2 * k + i) * programs + p0 + parts
                    live = p0 + parts < programs
                    total += tl.load(at, mask=live, other=0.0, cache_modifier=".cg")
                reduced = reduced + (tl.sum(total) * weights[i],)
            tl.store(ce_ptr + k, reduced[0])
            tl.store(mimicry_ptr + k, reduced[1])
            loss += _weighted_ce(reduced[0], ce_weight, CE) + alpha_t2 * reduced[1]
        tl.store(loss_ptr, loss)
        tl.store(ticket_ptr, 0)


@triton.jit
def _merge_parts(stats_ptr, r, splits, a_t, K: tl.constexpr, SPLITS_PAD: tl.constexpr,
                 MODE: tl.constexpr, HAS_T: tl.constexpr):  # fmt: skip
    """A split row's per-peer (m, s, st, mu, su) from its chunks', merged in a fixed order."""
    parts = tl.arange(0, SPLITS_PAD)
    live = parts < splits
    base = stats_ptr + (r * splits + parts) * (_STAT_FIELDS * K)
    merged = ()
    for k in tl.static_range(K):
        m = tl.load(base + k, mask=live, other=float("-inf"))
        s = tl.load(base + K + k, mask=live, other=0.0)
        st = tl.load(base + 2 * K + k, mask=live, other=0.0) if HAS_T else s
        row_m, row_s, row_st = _merge_lse(m, s, st, a_t, HAS_T)
        row_mu, row_su = row_m, row_s
        if MODE == 2:
            mu = tl.load(base + 3 * K + k, mask=live, other=float("-inf"))
            su = tl.load(base + 4 * K + k, mask=live, other=0.0)
            row_mu, row_su, _ = _merge_lse(mu, su, su, a_t, False)
        merged = merged + ((row_m, row_s, row_st, row_mu, row_su),)
    return merged


# Integers that only bound loops are not specialized (each value, or its divisibility by 16,
# would compile another kernel). The strides are in vectors of VEC classes and C in classes: an
# offset that is a multiple of VEC lets the compiler prove a vector's addresses aligned and emit
# 16-byte accesses.
@triton.jit(
    do_not_specialize=[
        "R", "C", "stride_k", "stride_r", "stride_scale_k", "stride_scale_r", "chunk", "splits",
        "ignore_index",
    ]
)  # fmt: skip
def _mutual_loss_kernel(
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
    partial_ptr,
    ticket_ptr,
    normalizer_ptr,
    R,
    C,
    stride_k,
    stride_r,
    stride_scale_k,
    stride_scale_r,
    chunk,
    splits,
    inv_t_hi,
    inv_t_lo,
    alpha_t_hi,
    alpha_t_lo,
    alpha_t2_hi,
    alpha_t2_lo,
    smoothing_hi,
    smoothing_lo,
    ce_weight_hi,
    ce_weight_lo,
    beta_hi,
    beta_lo,
    one_minus_beta_hi,
    one_minus_beta_lo,
    ignore_index,
    K: tl.constexpr,
    VEC: tl.constexpr,
    LANES: tl.constexpr,
    STAGE: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    MODE: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    REDUCTION: tl.constexpr,
    SCALE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    CE: tl.constexpr,
    MIMIC_UNLABELED: tl.constexpr,
    NORMALIZER: tl.constexpr,
    ACC: tl.constexpr,
):
    """STAGE 0: whole rows, rows pid, pid + programs, ... of a persistent grid; SINGLE_TILE (C at
    most one tile, decided on the host) keeps the row's tile from pass 1 for pass 2. A row split
    over programs (axis 1: its chunk of `chunk` vectors) takes three launches: STAGE 1 writes each
    chunk's statistics to `stats`, STAGE 2 merges them, writes the chunk's gradient and its loss
    sums to `sums`, STAGE 3 (a persistent grid again) merges those into the row's terms. The
    reduced outputs of STAGE 0 and 3 go through _reduce_programs. DIVERGENCE (0: KL, 1: reverse
    KL, 2: JSD) other than KL writes the gradient in a third pass over the row, after its sums:
    for a split row STAGE 4, between STAGE 2 and 3. A row whose target is ignore_index is
    computed only with MIMIC_UNLABELED, without a cross-entropy. CE: 0 where ce_weight is 0 (no
    cross-entropy at all), 1 where it is 1, else 2."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    programs = tl.num_programs(0)
    CV = C // VEC  # the host picks a VEC that divides C and the strides
    lanes = tl.arange(0, LANES)
    cols = (lanes * VEC)[:, None] + tl.arange(0, VEC)[None, :]
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    alpha_t = tl.cast(alpha_t_hi, ACC) + tl.cast(alpha_t_lo, ACC)
    alpha_t2 = tl.cast(alpha_t2_hi, ACC) + tl.cast(alpha_t2_lo, ACC)
    smoothing = tl.cast(smoothing_hi, ACC) + tl.cast(smoothing_lo, ACC)
    ce_weight = tl.cast(ce_weight_hi, ACC) + tl.cast(ce_weight_lo, ACC)
    betas = (
        tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC),
        tl.cast(one_minus_beta_hi, ACC) + tl.cast(one_minus_beta_lo, ACC),
    )
    zero = tl.zeros([], ACC)
    a_t = inv_t * _LOG2E
    inv_km1 = tl.full([], 1.0 / (K - 1), ACC)  # a tensor of ACC: a float64 1 / 3 stays exact
    u_scale = inv_t * inv_km1
    # Peer weights: W[k, j] weighs KL(q_j || q_k); the uniform modes use closed forms, read none.
    weights = ()
    if MODE == 3:
        for k in tl.static_range(K):
            w_k = ()
            for j in tl.static_range(K):
                w_k = w_k + (tl.load(weights_ptr + k * K + j).to(ACC),)
            weights = weights + (w_k,)
    # The row weights of the cross-entropy and of the mimicry, and the first times ce_weight
    # relative to the second: 1 where they agree (ce_weight 1, labeled rows only).
    row_weights = (zero, zero)
    ce_relative = 0.0 if CE == 0 else 1.0
    if STAGE != 1:
        row_weights = _row_weights(target_ptr, normalizer_ptr, R, ignore_index, REDUCTION,
                                   MIMIC_UNLABELED, NORMALIZER, ACC)  # fmt: skip
        if CE == 2 or (CE == 1 and MIMIC_UNLABELED):
            ce_relative = _weighted_ce(row_weights[0], ce_weight, CE) / row_weights[1]
    # The rows' terms a program adds up for a reduced loss, per peer (cross-entropy, mimicry).
    totals = ()
    for _ in tl.static_range(K):
        totals = totals + ((zero, zero),)
    # STAGE 1, 2 and 4: one row a program, the grid being (R, splits).
    step = programs if STAGE == 0 or STAGE == 3 else R
    v_lo = part * chunk
    v_hi = tl.minimum(v_lo + chunk, CV) if STAGE == 1 or STAGE == 2 or STAGE == 4 else CV
    for r in range(pid, R, step):
        row = tl.cast(r, tl.int64)  # offsets pass 2**31 at language-model sizes
        y = tl.load(target_ptr + row)
        # (peer 0's row, the peers' stride) of the logits and of the gradient, in elements:
        # multiples of VEC, so the compiler knows every vector aligned.
        rows_at = ((row * stride_r) * VEC, tl.cast(stride_k, tl.int64) * VEC)
        g_rows = ((row * CV) * VEC, (tl.cast(R, tl.int64) * CV) * VEC)
        ignored = y == ignore_index
        computed = ~ignored & (y >= 0) & (y < C)
        if MIMIC_UNLABELED:
            computed = computed | ignored
        if computed:
            terms = _row(
                logits_ptr, grad_ptr, stats_ptr, sums_ptr, scale_ptr, rows_at, g_rows, row, y,
                ~ignored, part, v_lo, v_hi, C, splits, stride_scale_k, stride_scale_r, lanes,
                cols, weights, row_weights[1], ce_relative, betas, a_t, u_scale, inv_km1,
                alpha_t, smoothing,
                K, VEC, LANES, STAGE, SINGLE_TILE, SPLITS_PAD, MODE, HAS_T, HAS_SMOOTHING,
                COMPUTE_GRAD, SCALE, DIVERGENCE, CE, MIMIC_UNLABELED, ACC,
            )  # fmt: skip
        else:
            # A row that reads no logits (nothing there may leak): 0 where ignored, NaN where its
            # target is out of range.
            value = tl.where(ignored, zero, float("nan"))
            if COMPUTE_GRAD and (STAGE == 0 or STAGE == 2):
                _fill_grad(grad_ptr, g_rows, v_lo, v_hi, value, lanes, cols, K, VEC, LANES)
            terms = ()
            for _ in tl.static_range(K):
                terms = terms + ((value, value),)
        if STAGE == 0 or STAGE == 3:
            if REDUCTION == 0:
                for k in tl.static_range(K):
                    ce, mimicry = terms[k]
                    tl.store(ce_ptr + k * R + row, ce)
                    tl.store(mimicry_ptr + k * R + row, mimicry)
                    loss = _weighted_ce(ce, ce_weight, CE) + alpha_t2 * mimicry
                    tl.store(loss_ptr + k * R + row, loss)
            else:
                summed = ()
                for k in tl.static_range(K):
                    summed = summed + ((totals[k][0] + terms[k][0], totals[k][1] + terms[k][1]),)
                totals = summed
    if (STAGE == 0 or STAGE == 3) and REDUCTION != 0:
        _reduce_programs(
            totals, partial_ptr, ticket_ptr, loss_ptr, ce_ptr, mimicry_ptr, row_weights,
            ce_weight, alpha_t2, K, CE,
        )  # fmt: skip


@triton.jit
def _pass_1(logits_ptr, rows_at, kept, v_lo, v_hi, lanes, cols, a_t, u_scale, K: tl.constexpr,
            VEC: tl.constexpr, LANES: tl.constexpr, SINGLE_TILE: tl.constexpr,
            MODE: tl.constexpr, HAS_T: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Each peer's (m, s, st, mu, su) over vectors [v_lo, v_hi): whole tiles unmasked, then the
    masked tail. What it reads stays in L2 for pass 2 where it can (evict_last)."""
    start = tl.full([LANES], float("-inf"), ACC)
    empty = tl.zeros([LANES], ACC)
    stats = ()
    for _ in tl.static_range(K):
        stats = stats + ((start, empty, empty, start, empty),)
    if SINGLE_TILE:
        stats = _fold_tile(stats, kept, a_t, u_scale, K, MODE, HAS_T)
    else:
        tiles = (v_hi - v_lo) // LANES
        for i in range(tiles):
            v0 = v_lo + i * LANES
            zs = _load_peers(logits_ptr, rows_at, v0, lanes, cols, v_hi, False, "evict_last",
                             K, VEC, ACC)  # fmt: skip
            stats = _fold_tile(stats, zs, a_t, u_scale, K, MODE, HAS_T)
        tail = v_lo + tiles * LANES
        if tail < v_hi:
            zs = _load_peers(logits_ptr, rows_at, tail, lanes, cols, v_hi, True, "evict_last",
                             K, VEC, ACC)  # fmt: skip
            stats = _fold_tile(stats, zs, a_t, u_scale, K, MODE, HAS_T)
    return _lanes_stats(stats, a_t, K, MODE, HAS_T)


@triton.jit
def _pass_2(logits_ptr, grad_ptr, rows_at, g_rows, kept, rows, coefs, weights, betas, y,
            v_lo, v_hi, lanes, cols, a_t, u_scale, inv_km1, K: tl.constexpr, VEC: tl.constexpr,
            LANES: tl.constexpr, SINGLE_TILE: tl.constexpr, MODE: tl.constexpr,
            HAS_T: tl.constexpr, HAS_SMOOTHING: tl.constexpr, CE: tl.constexpr,
            DIVERGENCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    """Each peer's loss sums over vectors [v_lo, v_hi), and their gradient: the tail first,
    then the whole tiles last first, so that what pass 1 read last, the likeliest still in L2,
    is read first (evict_first: none of it is read again). Also pass 3 of the divergences other
    than KL, which writes the gradient only."""
    empty = tl.zeros([LANES, VEC], ACC)
    sums = ()
    for _ in tl.static_range(K):
        sums = sums + ((empty, empty, empty),)
    beta, one_minus_beta = betas
    if SINGLE_TILE:
        sums = _emit_tile(sums, kept, rows, coefs, weights, a_t, u_scale, inv_km1, beta,
                          one_minus_beta, y, 0, lanes, cols, v_hi, grad_ptr, g_rows, True, K,
                          VEC, MODE, HAS_T, HAS_SMOOTHING, CE, DIVERGENCE,
                          COMPUTE_GRAD)  # fmt: skip
    else:
        tiles = (v_hi - v_lo) // LANES
        tail = v_lo + tiles * LANES
        if tail < v_hi:
            zs = _load_peers(logits_ptr, rows_at, tail, lanes, cols, v_hi, True, "evict_first",
                             K, VEC, ACC)  # fmt: skip
            sums = _emit_tile(sums, zs, rows, coefs, weights, a_t, u_scale, inv_km1, beta,
                              one_minus_beta, y - tail * VEC, tail, lanes, cols, v_hi, grad_ptr,
                              g_rows, True, K, VEC, MODE, HAS_T, HAS_SMOOTHING, CE,
                              DIVERGENCE, COMPUTE_GRAD)  # fmt: skip
        for i in range(tiles):
            v0 = v_lo + (tiles - 1 - i) * LANES
            zs = _load_peers(logits_ptr, rows_at, v0, lanes, cols, v_hi, False, "evict_first",
                             K, VEC, ACC)  # fmt: skip
            sums = _emit_tile(sums, zs, rows, coefs, weights, a_t, u_scale, inv_km1, beta,
                              one_minus_beta, y - v0 * VEC, v0, lanes, cols, v_hi, grad_ptr,
                              g_rows, False, K, VEC, MODE, HAS_T, HAS_SMOOTHING, CE,
                              DIVERGENCE, COMPUTE_GRAD)  # fmt: skip
    return _lanes_sums(sums, K, MODE, HAS_SMOOTHING, DIVERGENCE)


@triton.jit
def _store_fields(ptr, values, K: tl.constexpr, FIELDS: tl.constexpr):
    """A chunk's per-peer values (FIELDS a peer) at ptr[field * K + k], for the split's merge."""
    for k in tl.static_range(K):
        for field in tl.static_range(FIELDS):
            tl.store(ptr + field * K + k, values[k][field])


@triton.jit
def _merge_sums(sums_ptr, r, splits, K: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """A split row's per-peer loss sums, the chunks' added in a fixed order."""
    parts = tl.arange(0, SPLITS_PAD)
    base = sums_ptr + (r * splits + parts) * (_SUM_FIELDS * K)
    sums = ()
    for k in tl.static_range(K):
        fields = ()
        for field in tl.static_range(_SUM_FIELDS):
            at = base + field * K + k
            fields = fields + (tl.sum(tl.load(at, mask=parts < splits, other=0.0)),)
        sums = sums + (fields,)
    return sums


@triton.jit
def _row(logits_ptr, grad_ptr, stats_ptr, sums_ptr, scale_ptr, rows_at, g_rows, r, y, labeled,
         part, v_lo, v_hi, C, splits, stride_scale_k, stride_scale_r, lanes, cols, weights,
         factor, ce_relative, betas, a_t, u_scale, inv_km1, alpha_t, smoothing,
         K: tl.constexpr,
         VEC: tl.constexpr, LANES: tl.constexpr, STAGE: tl.constexpr,
         SINGLE_TILE: tl.constexpr, SPLITS_PAD: tl.constexpr, MODE: tl.constexpr,
         HAS_T: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
         SCALE: tl.constexpr, DIVERGENCE: tl.constexpr, CE: tl.constexpr,
         MIMIC_UNLABELED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """One row that is computed (its chunk [v_lo, v_hi) in STAGE 1, 2 and 4): its terms per
    peer, (cross-entropy, mimicry), in STAGE 0 and 3; STAGE 1 and 2 write theirs to memory,
    STAGE 4 the chunk's gradient (_grad_coefs: factor, ce_relative, 0 where the row has no
    label)."""
    if MIMIC_UNLABELED:
        ce_relative = tl.where(labeled, ce_relative, 0.0)
    kept = ()
    if SINGLE_TILE:  # loaded once, for every pass
        kept = _load_peers(logits_ptr, rows_at, 0, lanes, cols, v_hi, True, "evict_first", K,
                           VEC, ACC)  # fmt: skip
    if STAGE <= 1:
        stats = _pass_1(logits_ptr, rows_at, kept, v_lo, v_hi, lanes, cols, a_t, u_scale, K,
                        VEC, LANES, SINGLE_TILE, MODE, HAS_T, ACC)  # fmt: skip
    else:
        stats = _merge_parts(stats_ptr, r, splits, a_t, K, SPLITS_PAD, MODE, HAS_T)
    if STAGE == 1:
        _store_fields(stats_ptr + (r * splits + part) * (_STAT_FIELDS * K), stats, K,
                      _STAT_FIELDS)  # fmt: skip
    rows = _peer_rows(stats, K, HAS_T)
    if STAGE == 3 or STAGE == 4:
        sums = _merge_sums(sums_ptr, r, splits, K, SPLITS_PAD)
    elif STAGE != 1:
        coefs = ()
        if DIVERGENCE == 0:
            coefs = _grad_coefs(scale_ptr, stride_scale_k, stride_scale_r, r, factor,
                                ce_relative, (), weights, alpha_t, inv_km1, smoothing, betas[1],
                                C, K, MODE, HAS_T, DIVERGENCE, SCALE)  # fmt: skip
        sums = _pass_2(logits_ptr, grad_ptr, rows_at, g_rows, kept, rows, coefs, weights,
                       betas, y, v_lo, v_hi, lanes, cols, a_t, u_scale, inv_km1, K, VEC, LANES,
                       SINGLE_TILE, MODE, HAS_T, HAS_SMOOTHING, CE, DIVERGENCE,
                       COMPUTE_GRAD and DIVERGENCE == 0, ACC)  # fmt: skip
    if STAGE == 2:
        _store_fields(sums_ptr + (r * splits + part) * (_SUM_FIELDS * K), sums, K, _SUM_FIELDS)
    if DIVERGENCE != 0 and COMPUTE_GRAD and (STAGE == 0 or STAGE == 4):  # pass 3
        coefs = _grad_coefs(scale_ptr, stride_scale_k, stride_scale_r, r, factor, ce_relative,
                            sums, weights, alpha_t, inv_km1, smoothing, betas[1], C, K, MODE,
                            HAS_T, DIVERGENCE, SCALE)  # fmt: skip
        _pass_2(logits_ptr, grad_ptr, rows_at, g_rows, kept, rows, coefs, weights, betas, y,
                v_lo, v_hi, lanes, cols, a_t, u_scale, inv_km1, K, VEC, LANES, SINGLE_TILE, MODE,
                HAS_T, False, CE, DIVERGENCE, True, ACC)  # fmt: skip
    zero = tl.zeros([], ACC)
    terms = ()
    for _ in tl.static_range(K):
        terms = terms + ((zero, zero),)
    if STAGE == 0 or STAGE == 3:
        label = tl.where(labeled, y, 0) if MIMIC_UNLABELED else y
        z_label = ()
        for k in tl.static_range(K):
            z = zero
            if CE != 0:
                z = tl.load(logits_ptr + rows_at[0] + k * rows_at[1] + label).to(ACC)
            z_label = z_label + (z,)
        terms = _row_terms(rows, sums, z_label, labeled, weights, inv_km1, smoothing, betas[0],
                           betas[1], C, K, MODE, HAS_SMOOTHING, CE, MIMIC_UNLABELED,
                           DIVERGENCE)  # fmt: skip
    return terms


@triton.jit
def _scale_row(grad_ptr, row, g, CV, lanes, cols, VEC: tl.constexpr, LANES: tl.constexpr):
    base = (tl.cast(row, tl.int64) * CV) * VEC
    for v0 in range(0, CV, LANES):
        at = grad_ptr + base + v0 * VEC + cols
        live = (v0 + lanes < CV)[:, None]
        x = tl.load(at, mask=live)
        tl.store(at, (x.to(g.dtype) * g).to(x.dtype), mask=live)


@triton.jit(do_not_specialize=["rows", "R", "C", "stride_k", "stride_r"])
def _scale_grad_kernel(grad_ptr, grad_loss_ptr, rows, R, C, stride_k, stride_r,
                       VEC: tl.constexpr, LANES: tl.constexpr, PER_ROW: tl.constexpr):  # fmt: skip
    """grad[k, r] *= grad_loss[k, r] (PER_ROW; else one value) over a persistent grid, row by
    row; rows whose factor is 1 are left alone, so for one value of 1 every program returns at
    once."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    CV = C // VEC
    lanes = tl.arange(0, LANES)
    cols = (lanes * VEC)[:, None] + tl.arange(0, VEC)[None, :]
    if PER_ROW:
        for row in range(pid, rows, programs):
            k = row // R
            g = tl.load(grad_loss_ptr + k * stride_k + (row - k * R) * stride_r)
            if g != 1:
                _scale_row(grad_ptr, row, g, CV, lanes, cols, VEC, LANES)
    else:
        g = tl.load(grad_loss_ptr)
        if g != 1:
            for row in range(pid, rows, programs):
                _scale_row(grad_ptr, row, g, CV, lanes, cols, VEC, LANES)


def _split(x: float, name: str) -> tuple[float, float]:
    """x as hi + lo, two float32 numbers: Triton passes Python floats as float32, and float64
    logits need their options to about 48 bits."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    _require(math.isfinite(hi), f"{name} = {x} is beyond the float32 range the kernels take")
    return hi, x - hi


@dataclass(frozen=True)
class Launch:
    """One launch of a kernel: its grid, constexprs, warps and registers a thread (None: as
    many as the compiler likes)."""

    grid: tuple[int, int]
    constexprs: dict
    num_warps: int
    maxnreg: int | None = None

    @property
    def options(self) -> dict:
        return dict(num_warps=self.num_warps, maxnreg=self.maxnreg)


@dataclass(frozen=True)
class Plan:
    """How the forward computes one problem: the launches, and the split of a row's vectors."""

    chunk: int  # vectors a program takes of a split row
    splits: int  # programs a row
    launches: tuple[Launch, ...]


def vector_width(k: int, num_classes: int, dtype: torch.dtype, strides: tuple[int, ...]) -> int:
    """Classes a vector access takes: at most _VECTOR_BYTES and _PEER_REGISTERS, and a divisor of
    C and of the strides, so that every vector is aligned (rows such as C = 50257 then go one
    class at a time)."""
    words = accumulation_dtype(dtype).itemsize // 4
    vec = min(_VECTOR_BYTES // dtype.itemsize, max(_PEER_REGISTERS // (k * words), 1))
    vec = 1 << (vec.bit_length() - 1)
    while vec > 1 and any(n % vec for n in (num_classes, *strides)):
        vec //= 2
    return vec


def _tile(vectors: int) -> tuple[int, int]:
    """(LANES, num_warps): a vector of each peer a thread, up to _MAX_WARPS warps."""
    num_warps = min(triton.next_power_of_2(triton.cdiv(vectors, 32)), _MAX_WARPS)
    return min(32 * num_warps, triton.next_power_of_2(vectors)), num_warps


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Of a CUDA device; 1 elsewhere (Triton's interpreter on CPU tensors, the compile check's
    meta tensors), where the grid has no hardware to fill."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def resident_programs(device: torch.device, num_warps: int, registers: int) -> int:
    """The persistent grid's programs: as many as are resident at once, by registers (65536 a
    multiprocessor) and threads (2048)."""
    threads = 32 * num_warps
    return _multiprocessors(device) * max(min(65536 // (registers * threads), 2048 // threads), 1)


def plan(
    k: int,
    rows: int,
    num_classes: int,
    vec: int,
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    has_t: bool,
    has_smoothing: bool,
    compute_grad: bool,
    reduction: str,
    scale: int,
    divergence: str = "kl",
    ce_weight: float = 1.0,
    mimic_unlabeled: bool = False,
    has_normalizer: bool = False,
) -> Plan:
    """The launches of the forward for logits [k, rows, num_classes] of `dtype` read in vectors
    of `vec` classes: the one place that decides tiles, warps, grids and splits (the op launches
    them; the compile check and the static report enumerate them). `divergence` is the one
    computed ("jsd" at beta 0 or 1 comes as the KL it is).

    A row's classes are split across programs when there are too few rows to fill the GPU and each
    chunk keeps at least SPLIT_MIN_CLASSES: three launches, merged in a fixed order, and a fourth
    for the gradient of a divergence other than KL.
    """
    vectors = num_classes // vec
    lanes, num_warps = _tile(vectors)
    splits = min(triton.cdiv(SPLIT_PROGRAMS, max(rows, 1)), num_classes // SPLIT_MIN_CLASSES)
    chunk = vectors
    if splits > 1:
        chunk = triton.cdiv(triton.cdiv(vectors, splits), lanes) * lanes  # whole tiles
        splits = triton.cdiv(vectors, chunk)
    else:
        splits = 1
    common = dict(
        K=k,
        VEC=vec,
        LANES=lanes,
        SPLITS_PAD=triton.next_power_of_2(splits),
        MODE=MODE_IDS[mode],
        HAS_T=has_t,
        HAS_SMOOTHING=has_smoothing,
        COMPUTE_GRAD=compute_grad,
        REDUCTION=REDUCTION_IDS[reduction],
        SCALE=scale,
        DIVERGENCE=DIVERGENCE_IDS[divergence],
        CE=0 if ce_weight == 0 else 1 if ce_weight == 1 else 2,
        MIMIC_UNLABELED=mimic_unlabeled,
        NORMALIZER=has_normalizer,
        ACC=tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32,
    )
    many = k >= (_MANY_JSD_PEERS if divergence == "jsd" else _MANY_PEERS)
    registers = _REGISTERS if not many and common["ACC"] == tl.float32 else 255
    persistent = (min(rows, resident_programs(device, num_warps, registers)), 1)
    if splits == 1:
        stages = [(persistent, 0, vectors <= lanes)]
    else:
        stages = [((rows, splits), 1, False), ((rows, splits), 2, False), (persistent, 3, False)]
        if divergence != "kl" and compute_grad:  # the gradient after the rows' sums
            stages.insert(2, ((rows, splits), 4, False))
    launches = tuple(
        Launch(grid, dict(common, STAGE=stage, SINGLE_TILE=single), num_warps, registers)
        for grid, stage, single in stages
    )
    return Plan(chunk, splits, launches)


_TICKETS: dict[tuple, Tensor] = {}


def _ticket(device: torch.device) -> Tensor:
    """The forward's ticket (_reduce_programs): zero before a launch, and left zero by it. Eager
    launches share one per device and stream, made once; a launch being captured into a CUDA
    graph gets its own, zeroed by a fill that the graph holds, so that the graph is whole
    whichever stream replays it."""
    stream = None
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device).stream_id
    ticket = _TICKETS.get((device, stream))
    if ticket is None:
        ticket = _TICKETS[device, stream] = torch.zeros(1, dtype=torch.int32, device=device)
    return ticket


def check_peers(k: int) -> None:
    if k > MAX_PEERS:
        raise ValueError(
            f"backend='triton' supports up to {MAX_PEERS} peers, got K = {k}; "
            "use backend='cuda' (or 'auto')"
        )


def _check_fused_args(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None,
    grad_scale: Tensor | None,
    mode: str,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    reduction: str,
) -> None:
    """The checks of the C++ op (csrc/mutual_loss.h, check_fused_args), before any kernel runs."""
    _check_logits_like(logits, "logits")
    k, rows, num_classes = logits.shape
    check_peers(k)
    _require(mode in MODE_IDS, f"unknown mode {mode!r} (expected one of {list(MODE_IDS)})")
    _require(
        reduction in REDUCTION_IDS,
        f"unknown reduction {reduction!r} (expected one of {list(REDUCTION_IDS)})",
    )
    _require(k >= 2, f"mutual learning needs at least 2 peers, got K = {k}")
    _require(num_classes >= 1, "logits need at least one class")
    _require(num_classes < 2**31, f"the Triton op takes C < 2**31 classes, got {num_classes}")
    _require(target.device == logits.device, f"target is on {target.device}, not {logits.device}")
    _require(target.dtype == torch.int64, f"target must be int64, got {target.dtype}")
    _require(target.shape == (rows,), f"target must be [{rows}], got {list(target.shape)}")
    _require(temperature > 0, f"temperature must be positive, got {temperature}")
    _require(0 <= label_smoothing <= 1, f"label_smoothing must be in [0, 1], got {label_smoothing}")
    _require(alpha >= 0, f"alpha must be >= 0, got {alpha}")
    acc = accumulation_dtype(logits.dtype)
    if mode == "weights":
        _require(weights is not None, "mode 'weights' needs the [K, K] weights")
        _check_acc_tensor(weights, "weights", [(k, k)], acc, logits.device)
    if grad_scale is not None:
        shapes = [(), (k, rows)] if reduction == "none" else [()]
        _check_acc_tensor(grad_scale, "grad_scale", shapes, acc, logits.device)


def _check_family_args(
    logits: Tensor,
    reduction: str,
    divergence: str,
    beta: float,
    ce_weight: float,
    normalizer: Tensor | None,
) -> None:
    """The checks of the C++ op (csrc/mutual_loss.h, check_family_args). A normalizer on the CPU
    (the interpreter's) is checked > 0 as the CPU op does; on the GPU its value is read by the
    kernel only (no host sync), where one <= 0 makes the loss NaN."""
    _require(
        divergence in DIVERGENCE_IDS,
        f"unknown divergence {divergence!r} (expected kl, reverse_kl or jsd)",
    )
    _require(0 <= beta <= 1, f"beta must be in [0, 1], got {beta}")
    _require(
        math.isfinite(ce_weight) and ce_weight >= 0,
        f"ce_weight must be a finite number >= 0, got {ce_weight}",
    )
    if normalizer is None:
        return
    _require(reduction == "mean", "normalizer divides the loss of reduction 'mean' only")
    _require(
        normalizer.device == logits.device,
        f"normalizer is on {normalizer.device}, not {logits.device} as the logits",
    )
    _require(
        normalizer.dim() == 0 and normalizer.dtype != torch.bool and not normalizer.is_complex(),
        f"normalizer must be a 0-dim real tensor, got shape {list(normalizer.shape)} and dtype "
        f"{normalizer.dtype}",
    )
    if normalizer.device.type == "cpu":
        _require(normalizer.item() > 0, f"normalizer must be > 0, got {normalizer.item()}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"fastdml: {message}")


def _check_logits_like(t: Tensor, name: str) -> None:
    _require(t.dim() == 3, f"{name} must be [K, R, C], got shape {list(t.shape)}")
    _require(
        t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}",
    )


def _check_acc_tensor(
    t: Tensor, name: str, shapes: list[tuple], acc: torch.dtype, device: torch.device
) -> None:
    """An argument in the accumulation dtype, of one of `shapes`."""
    _require(t.device == device, f"{name} is on {t.device}, not {device} as the logits")
    _require(tuple(t.shape) in shapes, f"{name} must have a shape of {shapes}, got {list(t.shape)}")
    _require(t.dtype == acc, f"{name} must be {acc} for these logits, got {t.dtype}")


def kernel_launches(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None,
    grad_scale: Tensor | None,
    mode: str,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
    divergence: str = "kl",
    beta: float = 0.5,
    ce_weight: float = 1.0,
    mimic_unlabeled: bool = False,
    normalizer: Tensor | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], list[tuple[Launch, tuple]]]:
    """The op's outputs (allocated, not yet written) and the launches that compute them, each
    with its arguments; bad arguments raise first. Shared by the op and the compile check
    (benchmarks/triton_compile.py), which calls it with meta tensors to compile exactly what the
    op launches."""
    _check_fused_args(
        logits, target, weights, grad_scale, mode, temperature, alpha, label_smoothing, reduction
    )
    _check_family_args(logits, reduction, divergence, beta, ce_weight, normalizer)
    if divergence == "jsd" and beta in (0.0, 1.0):  # defined as the KL and the reverse KL
        divergence = "kl" if beta == 0 else "reverse_kl"
    k, rows, num_classes = logits.shape
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    weights = weights.contiguous() if mode == "weights" else logits  # unread in other modes
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    reduced = reduction != "none"
    loss = torch.empty(() if reduced else (k, rows), dtype=acc, device=device)
    ce = torch.empty((k,) if reduced else (k, rows), dtype=acc, device=device)
    mimicry = torch.empty_like(ce)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=device)
    outputs = (loss, ce, mimicry, grad)
    if rows == 0:
        for output in outputs[:3] if reduced else ():
            output.zero_()  # no rows to add up: a loss of 0
        return outputs, []
    vec = vector_width(k, num_classes, logits.dtype, logits.stride()[:2])
    scale = 0 if grad_scale is None else 1 if grad_scale.dim() == 0 else 2
    work = plan(
        k, rows, num_classes, vec, logits.dtype, device, mode, temperature != 1.0,
        label_smoothing != 0.0 and ce_weight != 0, compute_grad, reduction, scale, divergence,
        ce_weight, mimic_unlabeled, normalizer is not None,
    )  # fmt: skip
    split = work.splits > 1
    stats = loss.new_empty((rows, work.splits, _STAT_FIELDS, k) if split else (0,))
    sums = loss.new_empty((rows, work.splits, _SUM_FIELDS, k) if split else (0,))
    partial = loss.new_empty((2 * k, work.launches[-1].grid[0]) if reduced else (0,))
    ticket = _ticket(device) if reduced else partial
    scale_strides = grad_scale.stride() if scale == 2 else (0, 0)
    arguments = (
        logits,
        target,
        weights,
        loss if grad_scale is None else grad_scale,
        loss,
        ce,
        mimicry,
        grad,
        stats,
        sums,
        partial,
        ticket,
        loss if normalizer is None else normalizer,
        rows,
        num_classes,
        logits.stride(0) // vec,
        logits.stride(1) // vec,
        *scale_strides,
        work.chunk,
        work.splits,
        *_split(1.0 / temperature, "1 / temperature"),
        *_split(alpha * temperature, "alpha * temperature"),
        *_split(alpha * temperature**2, "alpha * temperature**2"),
        *_split(label_smoothing, "label_smoothing"),
        *_split(ce_weight, "ce_weight"),
        *_split(beta, "beta"),
        *_split(1.0 - beta, "1 - beta"),
        ignore_index,
    )
    return outputs, [(launch, arguments) for launch in work.launches]


def _check_scale_grad_args(grad: Tensor, grad_loss: Tensor) -> None:
    """The checks of the C++ op (csrc/mutual_loss.h, check_scale_grad_args, and its autograd's)."""
    if grad.requires_grad or grad_loss.requires_grad:
        raise RuntimeError(
            "fastdml::triton_scale_grad_ rescales the gradient buffer of "
            "triton_fused_mutual_loss in place and is not differentiable; got a tensor that "
            "requires grad"
        )
    _check_logits_like(grad, "grad")
    _require(grad.is_contiguous(), "grad must be contiguous")
    shapes = [(), tuple(grad.shape[:2])]
    _check_acc_tensor(grad_loss, "grad_loss", shapes, accumulation_dtype(grad.dtype), grad.device)


def scale_launch(grad: Tensor, grad_loss: Tensor) -> tuple[Launch, tuple]:
    """The launch of `_scale_grad_kernel` and its arguments."""
    _check_scale_grad_args(grad, grad_loss)
    k, rows, num_classes = grad.shape
    vec = vector_width(1, num_classes, grad.dtype, ())
    lanes, num_warps = _tile(num_classes // vec)
    per_row = grad_loss.dim() > 0
    arguments = (
        grad,
        grad_loss,
        k * rows,
        rows,
        num_classes,
        *(grad_loss.stride() if per_row else (0, 0)),
    )
    grid = (min(k * rows, resident_programs(grad.device, num_warps, 32)), 1)
    return Launch(grid, dict(VEC=vec, LANES=lanes, PER_ROW=per_row), num_warps), arguments


# Triton's interpreter runs the kernels on CPU tensors (for tests), with no PTX.
INTERPRETED = isinstance(_scale_grad_kernel, InterpretedFunction)
_PTX = tl.constexpr(not INTERPRETED)


def _current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its current stream: the tensors' own, as
    the C++ op's device guard makes it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# An opaque custom op, also on CUDA: its launches hold state that tracing must not copy (the
# ticket), and the kernels gain nothing from being traced into a graph.
@custom_op("fastdml::triton_fused_mutual_loss", mutates_args=())
def fused_mutual_loss(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None,
    grad_scale: Tensor | None,
    mode: str,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
    divergence: str = "kl",
    beta: float = 0.5,
    ce_weight: float = 1.0,
    mimic_unlabeled: bool = False,
    normalizer: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _current_device(logits.device):
        outputs, launches = kernel_launches(
            logits, target, weights, grad_scale, mode, temperature, alpha, label_smoothing,
            ignore_index, reduction, compute_grad, divergence, beta, ce_weight, mimic_unlabeled,
            normalizer,
        )  # fmt: skip
        for launch, arguments in launches:
            _mutual_loss_kernel[launch.grid](*arguments, **launch.options, **launch.constexprs)
    return outputs


@custom_op("fastdml::triton_scale_grad_", mutates_args={"grad"})
def scale_grad_(grad: Tensor, grad_loss: Tensor) -> None:
    launch, arguments = scale_launch(grad, grad_loss)
    if grad.numel() > 0:
        with _current_device(grad.device):
            _scale_grad_kernel[launch.grid](*arguments, **launch.options, **launch.constexprs)


def _setup_context(ctx, inputs, output):
    """As the C++ op's autograd (csrc/mutual_loss_autograd.cpp): the gradient buffer belongs to
    the op (the caller's logits are never written), so the first backward rescales it in place
    and hands it to autograd; it stays out of save_for_backward's version checks, and its own
    version is checked instead. (A non-differentiable output holds no reference to this node, so
    keeping it on ctx makes no reference cycle.)"""
    logits, target, weights, grad_scale = inputs[:4]
    ctx.save_for_backward(logits, target, weights, inputs[15])  # the normalizer, version-checked
    grad = output[3]
    reusable = grad_scale is None and logits.dtype not in RECOMPUTE_GRAD_DTYPES
    ctx.grad = grad if reusable else None
    ctx.grad_version = grad._version
    ctx.options = inputs[4:10]
    ctx.family = inputs[11:15]
    ctx.mark_non_differentiable(*output[1:])
    # No zero-filled gradients for the outputs nothing differentiates (the gradient buffer is the
    # size of the logits: autograd would allocate and fill a copy of it in every backward).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_ce, _grad_mimicry, _grad_grad):
    """The forward's gradient, rescaled by the upstream gradient where it is not 1; where that
    buffer is not the loss's gradient as written (float16, whose gradient must take the upstream
    gradient before its cast; a forward given a grad_scale; a second backward through a retained
    graph, which finds it handed out already; a buffer changed since), the gradient computed again
    with the upstream gradient as grad_scale."""
    if grad_loss is None:
        return (None,) * 16
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused ops of fastdml have no double backward (create_graph=True); "
            "use backend='torch' for higher-order gradients"
        )
    logits, target, weights, normalizer = ctx.saved_tensors
    grad, ctx.grad = ctx.grad, None
    if grad is not None and grad.shape == logits.shape and grad._version == ctx.grad_version:
        scale_grad_(grad, grad_loss)
    else:
        grad = fused_mutual_loss(
            logits, target, weights, grad_loss, *ctx.options, True, *ctx.family, normalizer
        )[3]
    return (grad,) + (None,) * 15


fused_mutual_loss.register_fake(fused_fake)
fused_mutual_loss.register_autograd(_backward, setup_context=_setup_context)
scale_grad_.register_fake(lambda grad, grad_loss: None)
