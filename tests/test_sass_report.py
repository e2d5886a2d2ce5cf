"""benchmarks/sass_report.py's parsing, on synthetic SASS and names (no nvcc): loops, passes,
elements per iteration, kernel names, budgets and the markdown section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import sass_report as sr

ANON = "fastdml::gpu::detail::(anonymous namespace)"
ARGS = f"({ANON}::KernelArgs<{ANON}::AccOf<float>::type>)"

# A row kernel for KT = 2, VEC = 4 (float32), as cuobjdump -sass prints it: a row loop holding a
# pass-1 loop through the cache (4 16-byte loads: KT * VEC * B = 16 elements, B = 2), a pass-2 loop
# over the cache (2 vectors: 8 elements) with a cold block placed after the EXIT, a copy loop with
# no MUFU (the peer weights), and a shuffle's divergent fallback that jumps back (no loop).
CUOBJDUMP = """
        code for sm_90
                Function : _Z4rowsPf
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;             /* 0x00000a00ff017b82 */
                                                                      /* 0x000fe40000000800 */
        /*0010*/                   MOV R0, RZ ;
        /*0020*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.EF.128 R8, desc[UR4][R2.64+0x10] ;
        /*0040*/                   LDG.E.EF.128 R12, desc[UR4][R2.64+0x20] ;
        /*0050*/                   LDG.E.EF.128 R16, desc[UR4][R2.64+0x30] ;
        /*0060*/                   STS.128 [R20], R4 ;
        /*0070*/                   MUFU.EX2 R21, R4 ;
        /*0080*/                   NOP ;
        /*0090*/               @P0 BRA 0x20 ;
        /*00a0*/                   LDS.128 R4, [R20] ;
        /*00b0*/                   LDS.128 R8, [R20+0x10] ;
        /*00c0*/                   MUFU.EX2 R21, R4 ;
        /*00d0*/               @P3 BRA 0x1b0 ;
        /*00e0*/                   STG.E.EF.128 desc[UR4][R2.64], R4 ;
        /*00f0*/                   STG.E.EF.128 desc[UR4][R2.64+0x10], R8 ;
        /*0100*/               @P1 BRA 0xa0 ;
        /*0110*/                   LDG.E R4, desc[UR4][R6.64] ;
        /*0120*/                   STS [R20], R4 ;
        /*0130*/               @P2 BRA 0x110 ;
        /*0140*/                   BRA.DIV UR4, 0x180 ;
        /*0150*/                   SHFL.BFLY PT, R5, R4, 0x1, 0x1f ;
        /*0160*/               @P4 BRA 0x10 ;
        /*0170*/                   EXIT ;
        /*0180*/                   WARPSYNC.COLLECTIVE R6, 0x150 ;
        /*0190*/                   BRA 0x150 ;
        /*01a0*/                   BRA 0x1a0;
        /*01b0*/                   FADD R9, R9, -1 ;
        /*01c0*/                   BRA 0xe0 ;
"""

# The source of the lambdas the line info points into (see PASS_REGIONS).
SOURCE = """\
// fold's pass: { unbalanced braces in comments and "strings {" are ignored
template <typename S, int KT, int VEC>
__global__ void rows(const S* x) {
  const auto fold = [&](int64_t, const P(&x)[KT]) {
    lse.fold(x);
  };
  const auto emit = [&](int64_t v, const P(&x)[KT]) {
    store(v, x);
  };
  team_lse(lse);
}

__device__ void block_stats(const float* x, int k) {
  for (int c = 0; c < 8; ++c) fold_one(x[c]);
}
"""

# nvdisasm -c -gi of a kernel: two pass loops (labels as targets, line info into SOURCE, an
# indirect branch with its targets) and a loop with MUFU that no region claims (team_lse).
NVDISASM = """
//--------------------- .text._Z4rowsPf --------------------------
        .section        .text._Z4rowsPf,"ax",@progbits
.text._Z4rowsPf:
        .type           _Z4rowsPf,@function
_Z4rowsPf:
        //## File "/tmp/x/csrc/k.cuh", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        //## File "/tmp/x/csrc/k.cuh", line 3
        /*0010*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        //## File "/tmp/x/csrc/k.cuh", line 5 inlined at "/tmp/x/csrc/k.cuh", line 4
        //## File "/tmp/x/csrc/k.cuh", line 4
        /*0020*/                   MUFU.EX2 R6, R4 ;
        /*0030*/                   FADD R7, R7, R6 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        //## File "/tmp/x/csrc/k.cuh", line 8 inlined at "/tmp/x/csrc/k.cuh", line 7
        //## File "/tmp/x/csrc/k.cuh", line 7
        /*0050*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0060*/                   MUFU.EX2 R6, R4 ;
        /*0070*/                   BRX R8 -0x80 (*"BRANCH_TARGETS .L_x_3,.L_x_4"*) ;
.L_x_3:
        /*0080*/                   FADD R9, R9, R6 ;
        /*0090*/                   BRA `(.L_x_4) ;
.L_x_4:
        /*00a0*/                   FMUL R9, R9, R6 ;
        /*00b0*/               @P1 BRA `(.L_x_2) ;
.L_x_5:
        //## File "/tmp/x/csrc/k.cuh", line 10
        /*00c0*/                   LDS R4, [R3] ;
        /*00d0*/                   MUFU.EX2 R6, R4 ;
        /*00e0*/               @P2 BRA `(.L_x_5) ;
        /*00f0*/                   EXIT ;
.L_x_6:
        /*0100*/                   BRA `(.L_x_6);
"""


# The source of a row kernel with its three ways: for_each_lse (no region) calls back into the
# region that calls it; cache_and_fold calls fold.
CLUSTER_SOURCE = """\
template <int KT>
__global__ void rows(const float* x) {
  const auto for_each_lse = [&](const P(&x)[KT], const auto& f) {
    for (int k = 0; k < KT; ++k) f(lse[k], x[k]);
  };
  const auto fold = [&](int64_t, const P(&x)[KT]) {
    for_each_lse(x, [](auto& st, auto v) { st.fold(v); });
  };
  const auto cache_and_fold = [&](int64_t v, const P(&x)[KT]) {
    cached(v) = x;
    fold(v, x);
  };
  const auto cache_and_max = [&](int64_t v, const P(&x)[KT]) {
    cached(v) = x;
    for_each_lse(x, [](auto& st, auto v) { st.take_max(v); });
  };
  const auto add_at_max = [&](int64_t v) {
    for_each_lse(cached(v), [](auto& st, auto v) { st.add(v); });
  };
  const auto emit = [&](int64_t v, const P(&x)[KT]) {
    store(v, x);
  };
}
"""

# nvdisasm -c -gi of a row kernel for KT = 2, VEC = 1 (float32) over CLUSTER_SOURCE (the LseState
# methods in lse.h), its loops at 0x10 cache_and_fold (8 instructions for 4 elements), 0x90 fold
# (7 / 4), 0x100 cache_and_max (7 / 4), 0x170 add_at_max (5 / 2), and two copies of emit over the
# cache, 0x1c0 (7 / 2) and 0x230 (8 / 2), one per path.
CLUSTER_NVDISASM = """
.text._Z4rowsPf:
        //## File "/tmp/x/csrc/c.cuh", line 2
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        //## File "/tmp/x/csrc/c.cuh", line 40
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0030*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;
        /*0040*/                   LDG.E R7, desc[UR4][R2.64+0xc] ;
        //## File "/tmp/x/csrc/c.cuh", line 10
        /*0050*/                   STS.64 [R20], R4 ;
        //## File "/tmp/x/csrc/lse.h", line 9 inlined at "/tmp/x/csrc/c.cuh", line 7
        //## File "/tmp/x/csrc/c.cuh", line 7 inlined at "/tmp/x/csrc/c.cuh", line 4
        //## File "/tmp/x/csrc/c.cuh", line 4 inlined at "/tmp/x/csrc/c.cuh", line 7
        //## File "/tmp/x/csrc/c.cuh", line 7 inlined at "/tmp/x/csrc/c.cuh", line 11
        //## File "/tmp/x/csrc/c.cuh", line 11
        /*0060*/                   MUFU.EX2 R8, R4 ;
        /*0070*/                   FADD R9, R9, R8 ;
        /*0080*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        //## File "/tmp/x/csrc/c.cuh", line 40
        /*0090*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00a0*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*00b0*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;
        /*00c0*/                   LDG.E R7, desc[UR4][R2.64+0xc] ;
        //## File "/tmp/x/csrc/lse.h", line 9 inlined at "/tmp/x/csrc/c.cuh", line 7
        //## File "/tmp/x/csrc/c.cuh", line 7 inlined at "/tmp/x/csrc/c.cuh", line 4
        //## File "/tmp/x/csrc/c.cuh", line 4 inlined at "/tmp/x/csrc/c.cuh", line 7
        //## File "/tmp/x/csrc/c.cuh", line 7
        /*00d0*/                   MUFU.EX2 R8, R4 ;
        /*00e0*/                   FADD R9, R9, R8 ;
        /*00f0*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        //## File "/tmp/x/csrc/c.cuh", line 40
        /*0100*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0120*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;
        /*0130*/                   LDG.E R7, desc[UR4][R2.64+0xc] ;
        //## File "/tmp/x/csrc/c.cuh", line 14
        /*0140*/                   STS.64 [R20], R4 ;
        //## File "/tmp/x/csrc/lse.h", line 12 inlined at "/tmp/x/csrc/c.cuh", line 15
        //## File "/tmp/x/csrc/c.cuh", line 15 inlined at "/tmp/x/csrc/c.cuh", line 4
        //## File "/tmp/x/csrc/c.cuh", line 4 inlined at "/tmp/x/csrc/c.cuh", line 15
        //## File "/tmp/x/csrc/c.cuh", line 15
        /*0150*/                   FMNMX R9, R9, R4, !PT ;
        /*0160*/               @P0 BRA `(.L_x_2) ;
.L_x_3:
        //## File "/tmp/x/csrc/c.cuh", line 18
        /*0170*/                   LDS R4, [R20] ;
        /*0180*/                   LDS R5, [R20+0x4] ;
        //## File "/tmp/x/csrc/lse.h", line 9 inlined at "/tmp/x/csrc/c.cuh", line 18
        //## File "/tmp/x/csrc/c.cuh", line 18 inlined at "/tmp/x/csrc/c.cuh", line 4
        //## File "/tmp/x/csrc/c.cuh", line 4 inlined at "/tmp/x/csrc/c.cuh", line 18
        //## File "/tmp/x/csrc/c.cuh", line 18
        /*0190*/                   MUFU.EX2 R8, R4 ;
        /*01a0*/                   FADD R9, R9, R8 ;
        /*01b0*/               @P0 BRA `(.L_x_3) ;
.L_x_4:
        //## File "/tmp/x/csrc/c.cuh", line 21
        /*01c0*/                   LDS R4, [R20] ;
        /*01d0*/                   LDS R5, [R20+0x4] ;
        /*01e0*/                   MUFU.EX2 R8, R4 ;
        /*01f0*/                   FMUL R4, R8, R4 ;
        /*0200*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0210*/                   STG.E desc[UR4][R2.64+0x4], R5 ;
        /*0220*/               @P0 BRA `(.L_x_4) ;
.L_x_5:
        //## File "/tmp/x/csrc/c.cuh", line 21
        /*0230*/                   LDS R4, [R20] ;
        /*0240*/                   LDS R5, [R20+0x4] ;
        /*0250*/                   MUFU.EX2 R8, R4 ;
        /*0260*/                   FMUL R4, R8, R4 ;
        /*0270*/                   FFMA R5, R8, R5, R4 ;
        /*0280*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0290*/                   STG.E desc[UR4][R2.64+0x4], R5 ;
        /*02a0*/               @P0 BRA `(.L_x_5) ;
        /*02b0*/                   EXIT ;
"""


def row_info(k: int = 2, vec: int = 4, path: str = "runtime") -> sr.KernelInfo:
    return sr.KernelInfo(sr.ROW_KERNEL, "float32", k, vec, "any", path)


def test_innermost_natural_loops() -> None:
    (function,) = sr.parse_disassembly(CUOBJDUMP)
    assert function.name == "_Z4rowsPf"
    loops = {loop.header: loop for loop in sr.find_loops(function)}
    # the row loop holds the others; the fallback's jump back and the self-loop are no loops
    assert sorted(loops) == [0x20, 0xA0, 0x110]
    assert len(loops[0x20].instructions) == 7  # the NOP does not count
    # the cold block after the EXIT is part of the pass-2 loop
    assert [i.address for i in loops[0xA0].instructions] == [
        0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0, 0x100, 0x1B0, 0x1C0
    ]  # fmt: skip
    assert loops[0x20].opcodes["LDG.E.EF.128"] == 4


def test_heuristic_passes_ways_and_elements() -> None:
    (function,) = sr.parse_disassembly(CUOBJDUMP)
    warnings: list[str] = []
    loops, how = sr.hot_loops(function, row_info(), {}, warnings)
    assert how == "heuristic"
    # the copy loop has no MUFU: not hot
    found = [(h.loop.header, h.pass_, h.way, h.elements, h.instructions) for h in loops]
    assert found == [(0x20, 1, "cache", 16, 7), (0xA0, 2, "cache", 8, 9)]
    assert warnings == []
    summary = sr.summarize(loops)
    assert summary["pass1_per_element"] == round(7 / 16, 2)
    assert summary["pass2_per_element"] == round(9 / 8, 2)
    assert summary["instructions_per_element"] == round(7 / 16 + 9 / 8, 2)
    assert summary["mufu_per_element"] == round(1 / 16 + 1 / 8, 3)
    assert summary["cluster_per_element"] is None  # no cache_and_max nor add_at_max loop


def test_elements_fall_back_to_the_template() -> None:
    (function,) = sr.parse_disassembly(CUOBJDUMP)
    warnings: list[str] = []
    # KT = 3: 16 elements of loads is no multiple of KT * VEC = 12, so the template's 12 counts
    loops, _ = sr.hot_loops(function, row_info(k=3), {}, warnings)
    assert [h.elements for h in loops] == [12, 12]
    assert len(warnings) == 2 and "not a multiple" in warnings[0]


def test_heuristic_without_gradient_orders_by_address() -> None:
    body = """
        Function : _Z1fv
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   MUFU.EX2 R6, R4 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   MUFU.EX2 R6, R4 ;
        /*0050*/                   MUFU.EX2 R7, R5 ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   EXIT ;
"""
    (function,) = sr.parse_disassembly(body)
    loops, _ = sr.hot_loops(function, row_info(k=4, vec=4), {}, [])
    assert [(h.loop.header, h.pass_, h.way) for h in loops] == [
        (0, 1, "global"),
        (0x30, 2, "global"),
    ]


def test_heuristic_leaves_out_shared_scratch_loops() -> None:
    """A loop over a reduction's shared scratch (team_lse: LDS and MUFU, no STG) is not hot."""
    body = """
        Function : _Z1fv
        /*0000*/                   LDS R4, [R3] ;
        /*0010*/                   MUFU.EX2 R6, R4 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   EXIT ;
"""
    (function,) = sr.parse_disassembly(body)
    assert len(sr.find_loops(function)) == 1
    assert sr.hot_loops(function, row_info(), {}, [])[0] == []


def test_source_regions_and_line_info() -> None:
    regions = sr.source_regions({"/tmp/x/csrc/k.cuh": SOURCE})
    assert regions == {"k.cuh": [(4, 6, "fold"), (7, 9, "emit"), (13, 15, "block_stats")]}
    (function,) = sr.parse_disassembly(NVDISASM)
    chains = {i.address: i.chain for i in function.instructions}
    assert chains[0x20] == (("k.cuh", 5), ("k.cuh", 4))
    assert chains[0x30] == chains[0x20]  # the chain holds until the next line info
    assert sr.region_of(function.instructions[2], regions) == "fold"
    branch = next(i for i in function.instructions if i.base == "BRX")
    assert branch.targets == (0x80, 0xA0) and not branch.conditional
    loops, how = sr.hot_loops(function, row_info(k=2, vec=1), regions, [])
    assert how == "lineinfo"
    # team_lse's loop at 0xc0 has LDS and MUFU but belongs to no pass
    found = [(h.loop.header, h.pass_, h.way, h.instructions) for h in loops]
    assert found == [(0x10, 1, "global", 4), (0x50, 2, "global", 7)]


def test_region_of_takes_the_innermost_region() -> None:
    regions = sr.source_regions({"/tmp/x/csrc/c.cuh": CLUSTER_SOURCE})
    assert regions == {
        "c.cuh": [
            (6, 8, "fold"),
            (9, 12, "cache_and_fold"),
            (13, 16, "cache_and_max"),
            (17, 19, "add_at_max"),
            (20, 22, "emit"),
        ]
    }
    (function,) = sr.parse_disassembly(CLUSTER_NVDISASM)
    at = {i.address: sr.region_of(i, regions) for i in function.instructions}
    # for_each_lse's code is its caller's; fold's inlined into cache_and_fold is fold's
    assert (at[0x10], at[0x50], at[0x60]) == (None, "cache_and_fold", "fold")
    assert (at[0xD0], at[0x150], at[0x190]) == ("fold", "cache_and_max", "add_at_max")
    # of regions nested in the source, the inner one
    nested = sr.Instruction(0, "FADD", "FADD", False, chain=(("n.cuh", 6),))
    assert sr.region_of(nested, {"n.cuh": [(1, 20, "emit"), (5, 8, "fold")]}) == "fold"


def test_cluster_way() -> None:
    regions = sr.source_regions({"/tmp/x/csrc/c.cuh": CLUSTER_SOURCE})
    (function,) = sr.parse_disassembly(CLUSTER_NVDISASM)
    warnings: list[str] = []
    loops, how = sr.hot_loops(function, row_info(k=2, vec=1), regions, warnings)
    assert how == "lineinfo" and warnings == []  # the heuristic agrees where it finds a loop
    found = [(h.loop.header, h.pass_, h.way, h.region, h.elements, h.instructions) for h in loops]
    assert found == [
        (0x10, 1, "cache", "cache_and_fold", 4, 8),
        (0x90, 1, "global", "fold", 4, 7),
        (0x100, 1, "cluster", "cache_and_max", 4, 7),
        (0x170, 1, "cluster", "add_at_max", 2, 5),
        (0x1C0, 2, "cache", "emit", 2, 7),
        (0x230, 2, "cache", "emit", 2, 8),
    ]
    # cache: 8/4 + 8/2 (the costlier copy of emit); global: 7/4 + the cache's pass 2; cluster:
    # both of its pass-1 loops, 7/4 + 5/2, and the cache's pass 2
    assert sr.summarize(loops) == {
        "instructions_per_element": 8.25,
        "pass1_per_element": 4.25,
        "pass2_per_element": 4.0,
        "cluster_per_element": 8.25,
        "mufu_per_element": 1.0,
    }
    # the kernels of each path (kClustered): the cluster way and emit; the cache and global ways
    alone = sr.summarize([h for h in loops if h.way == "cluster" or h.region == "emit"])
    assert alone["instructions_per_element"] == alone["cluster_per_element"] == 8.25
    other = sr.summarize([h for h in loops if h.way != "cluster"])
    assert other["instructions_per_element"] == 6.0 and other["cluster_per_element"] is None
    # without line info the cluster way's loops are not found: no MUFU, or no global memory
    loops, how = sr.hot_loops(function, row_info(k=2, vec=1), {}, warnings)
    assert how == "heuristic" and warnings == []
    assert [h.loop.header for h in loops] == [0x10, 0x90, 0x1C0, 0x230]
    assert sr.summarize(loops)["cluster_per_element"] is None
    assert sr.summarize(loops)["instructions_per_element"] == 6.0


def test_kernel_row_and_table() -> None:
    regions = sr.source_regions({"/tmp/x/csrc/c.cuh": CLUSTER_SOURCE})
    (function,) = sr.parse_disassembly(CLUSTER_NVDISASM)
    usage = dict(registers=40, stack=0, shared=16, local=0)
    info = sr.KernelInfo(sr.ROW_KERNEL, "float32", 2, 1, "pairwise", "default")
    row = sr.kernel_row(function, info, "rows", usage, 0, regions, [])
    assert [(loop["pass"], loop["way"]) for loop in row["loops"]] == [
        (1, "cache"), (1, "global"), (1, "cluster"), (1, "cluster"), (2, "cache"), (2, "cache")
    ]  # fmt: skip
    assert row["cluster_per_element"] == row["instructions_per_element"]
    assert row["backend"] == "cuda" and row["loop_barriers"] == 0
    table = sr.render([dict(row, compiler="nvcc 13")], [], 10)
    assert "with nvcc 13 and setup.py's flags" in table
    assert "| pass 1 | pass 2 | cluster | instructions / element |" in table
    cells = table.splitlines()[-1].split(" | ")
    assert cells[4:9] == ["`default`", "4.2", "4.0", "8.2", "8.2"]  # 4.25, 4, 8.25, 8.25


@pytest.mark.parametrize(
    ("demangled", "expected"),
    [
        (
            f"void {ANON}::mutual_loss_kernel<float, 4, 4>{ARGS}",
            ("mutual_loss_kernel", 4, 4, "any", "runtime"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<__nv_bfloat16, 2, 8, "
            f"{ANON}::FixedOptions<(fastdml::gpu::LossMode)0, true, false, true> >{ARGS}",
            ("mutual_loss_kernel", 2, 8, "pairwise", "default"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<__half, 6, 4, "
            f"{ANON}::FixedOptions<(fastdml::gpu::LossMode)2, false, true, false>>{ARGS}",
            ("mutual_loss_kernel", 6, 4, "ensemble_logits", "T!=1,smoothing,no_grad"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<float, 3, 1, "
            f"{ANON}::FixedOptions<fastdml::gpu::LossMode::Ensemble, (bool)1, (bool)0, (bool)0> "
            f">{ARGS}",
            ("mutual_loss_kernel", 3, 1, "ensemble", "no_grad,scalar"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<float, 8, 1, {ANON}::RuntimeOptions>{ARGS}",
            ("mutual_loss_kernel", 8, 1, "any", "runtime,scalar"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<float, 4, 4, "
            f"{ANON}::FixedOptions<(fastdml::gpu::LossMode)0, false, false, true>, true>{ARGS}",
            ("mutual_loss_kernel", 4, 4, "pairwise", "T!=1,cluster"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<float, 2, 1, {ANON}::RuntimeOptions, true>{ARGS}",
            ("mutual_loss_kernel", 2, 1, "any", "runtime,cluster,scalar"),
        ),
        (
            f"void {ANON}::mutual_loss_kernel<float, 2, 4, {ANON}::RuntimeOptions, false>{ARGS}",
            ("mutual_loss_kernel", 2, 4, "any", "runtime"),
        ),
        (
            f"void {ANON}::scale_grad_kernel<float, 1>({ANON}::ScaleArgs<float>)",
            ("scale_grad_kernel", None, 1, "any", "scale_grad,scalar"),
        ),
        (
            f"void {ANON}::split_finish_kernel<float>({ANON}::KernelArgs<float>)",
            ("split_finish_kernel", None, None, "any", "split_finish"),
        ),
    ],
)
def test_kernel_names(demangled: str, expected: tuple) -> None:
    info = sr.kernel_info(demangled, "float32")
    assert (info.base, info.K, info.vec, info.mode, info.path) == expected


def test_short_name() -> None:
    demangled = (
        f"void {ANON}::mutual_loss_kernel<float, 4, 4, "
        f"{ANON}::FixedOptions<(fastdml::gpu::LossMode)0, true, false, true> >{ARGS}"
    )
    expected = "mutual_loss_kernel<float, 4, 4, FixedOptions<(LossMode)0, true, false, true> >"
    assert sr.short_name(demangled) == expected


def test_budgets() -> None:
    default, temperature = (
        sr.BUDGETS[("cuda", "pairwise", "default")],
        sr.BUDGETS[("cuda", "pairwise", "T!=1")],
    )
    assert sr.budget_for("pairwise", "default") == default
    assert sr.budget_for("pairwise", "T!=1,smoothing") == temperature
    assert sr.budget_for("pairwise", "default,cluster") == default
    assert sr.budget_for("pairwise", "T!=1,cluster") == temperature
    triton = sr.BUDGETS[("triton", "pairwise", "default")]
    assert sr.budget_for("pairwise", "default", "triton", "bfloat16") == triton
    assert sr.budget_for("pairwise", "default", "triton", "float64") is None
    assert sr.budget_for("pairwise", "T!=1", "triton", "float32") is None
    assert sr.budget_for("pairwise", "default,cluster,scalar") is None
    assert sr.budget_for("ensemble", "default") is None
    assert sr.budget_for("pairwise", "smoothing") is None
    assert sr.budget_for("pairwise", "default,scalar") is None
    assert sr.budget_for("any", "runtime") is None


def test_order_puts_the_default_first_and_the_cluster_kernel_after_the_other() -> None:
    def row(dtype: str, k: int, path: str) -> dict:
        kernel = f"{dtype}{k}{path}"
        return dict(backend="cuda", dtype=dtype, K=k, mode="pairwise", path=path, kernel=kernel)

    rows = [row(d, k, p) for p in ("T!=1,cluster", "default,cluster", "default", "T!=1")
            for d in ("bfloat16", "float32") for k in (3, 2)]  # fmt: skip
    order = [(r["path"], r["dtype"], r["K"]) for r in sorted(rows, key=sr._order)]
    assert order[:4] == [
        ("default", "float32", 2),
        ("default,cluster", "float32", 2),
        ("default", "float32", 3),
        ("default,cluster", "float32", 3),
    ]
    assert order[8:10] == [("T!=1", "float32", 2), ("T!=1,cluster", "float32", 2)]


def test_widths() -> None:
    widths = {"LDG.E.EF.128": 16, "STG.E.64": 8, "LDS": 4, "LDG.E.U16": 2}
    assert {op: sr.width(op) for op in widths} == widths


def test_markdown_section(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# B\n\n## Small shapes\n\ntext\n\n## GPU\n\ngpu\n")
    sr.write_markdown(page, "first")
    text = page.read_text()
    begin, end = sr.MARKERS
    assert f"\n{sr.SECTION}\n\n{begin}\nfirst\n{end}\n\n## GPU\n" in text
    sr.write_markdown(page, "second")
    again = page.read_text()
    assert again == text.replace("first", "second")


# A Triton kernel's source and its nvdisasm -c -gi: line info with no inlining chain, each
# instruction at the line of the innermost function it comes from (_load at 2, _fold_lse at 5,
# _emit_tile at 8, the kernel's own loop at 12 and 14); a pass-1 loop of 2 peers' 16-byte loads
# (K = 2, VEC = 4: 8 elements) and a pass-2 loop that stores the gradient, with a barrier.
TRITON_SOURCE = """\
def _load(p):
    return tl.load(p)

def _fold_lse(m, x):
    return tl.maximum(m, x)

def _emit_tile(x):
    return x * 2

def kernel(p):
    for i in range(4):
        m = _fold_lse(m, _load(p))
    for i in range(4):
        _emit_tile(_load(p))
"""

TRITON_NVDISASM = """
.text._mutual_loss_kernel:
        //## File "/repo/kernels/mutual_loss.py", line 11
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        //## File "/repo/kernels/mutual_loss.py", line 2
        /*0010*/                   LDG.E.EL.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.EL.128 R8, desc[UR4][R2.64+0x10] ;
        //## File "/repo/kernels/mutual_loss.py", line 5
        /*0030*/                   FMNMX R12, R4, R5, !PT ;
        /*0040*/                   MUFU.EX2 R13, R12 ;
        //## File "/repo/kernels/mutual_loss.py", line 11
        /*0050*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        //## File "/repo/kernels/mutual_loss.py", line 2
        /*0060*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0070*/                   LDG.E.EF.128 R8, desc[UR4][R2.64+0x10] ;
        //## File "/repo/kernels/mutual_loss.py", line 8
        /*0080*/                   MUFU.EX2 R13, R4 ;
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00a0*/                   STG.E.EF.128 desc[UR4][R2.64], R4 ;
        /*00b0*/                   STG.E.EF.128 desc[UR4][R2.64+0x10], R8 ;
        //## File "/repo/kernels/mutual_loss.py", line 13
        /*00c0*/               @P0 BRA `(.L_x_1) ;
        /*00d0*/                   EXIT ;
"""


def test_triton_kernel_row(tmp_path: Path) -> None:
    source = tmp_path / "mutual_loss.py"
    source.write_text(TRITON_SOURCE)
    regions = sr.python_regions(str(source))
    assert regions == {"mutual_loss.py": [(4, 5, "_fold_lse"), (7, 8, "_emit_tile")]}
    (function,) = sr.parse_disassembly(TRITON_NVDISASM)
    info = sr.KernelInfo(sr.TRITON_ROW_KERNEL, "float32", 2, 4, "pairwise", "default", "triton")
    usage = dict(registers=100, stack=0, shared=0, local=0)
    warnings: list[str] = []
    row = sr.kernel_row(function, info, "spec", usage, 0, regions, warnings)
    assert warnings == []
    found = [
        (loop["pass"], loop["way"], loop["instructions"], loop["elements"]) for loop in row["loops"]
    ]
    assert found == [(1, "global", 5, 8), (2, "global", 7, 8)]
    assert row["backend"] == "triton" and row["instructions_per_element"] == 1.5
    assert row["loop_barriers"] == 1
    failures = sr.check([dict(row, _local_in_loops=[])])
    assert failures == ["spec [pairwise, default]: 1 barriers in its hot loops"]


TRITON_JOBS = """
import json
from benchmarks import sass_report as sr
jobs = sr.triton_jobs()
budgeted = [
    job for job in jobs
    if job.info.row_kernel
    and sr.budget_for(job.info.mode, job.info.path, "triton", job.info.dtype) is not None
]
(first,) = [j for j in budgeted if (j.info.dtype, j.info.K) == ("float32", 2)]
result = sr.analyze_triton(first)
print(json.dumps(dict(
    budgeted=sorted({(job.info.dtype, job.info.K) for job in budgeted}),
    stages=sorted({(dict(job.spec.constexprs)["STAGE"], dict(job.spec.constexprs)["SINGLE_TILE"])
                   for job in jobs if job.info.row_kernel}),
    roles=sorted({job.info.path for job in jobs if not job.info.row_kernel}),
    row={k: v for k, v in result["rows"][0].items() if not k.startswith("_")},
)))
"""


def test_triton_jobs_and_one_compile() -> None:
    """The report compiles the op's own specializations (outside Triton's interpreter): the
    budgeted ones are row kernels of rows of many tiles (a loop a pass), and the one of float32
    at K = 2 compiles to loops within its budget, with no barrier and 16-byte accesses."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_JOBS], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    targets = [["bfloat16", 2], ["bfloat16", 4], ["float32", 2], ["float32", 4]]
    assert [pair for pair in found["budgeted"] if pair in targets] == targets
    assert found["stages"] == [[0, False]]
    assert found["roles"] == [
        "scale_grad", "scale_grad,per_row", "split_emit", "split_finish", "split_stats"
    ]  # fmt: skip
    row = found["row"]
    assert {loop["pass"] for loop in row["loops"]} == {1, 2}
    assert row["instructions_per_element"] <= sr.budget_for("pairwise", "default", "triton")
    assert row["loop_barriers"] == 0 and row["spill_bytes"] == 0
    assert set(row["loads"] + row["stores"]) <= {"LDG.E.EL.128", "LDG.E.EF.128", "STG.E.EF.128"}
