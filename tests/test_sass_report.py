"""benchmarks/sass_report.py's parsing, on synthetic SASS and names (no nvcc): loops, passes,
elements per iteration, kernel names, budgets and the markdown section."""

from __future__ import annotations

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
    assert regions == {"k.cuh": [(4, 6, 1), (7, 9, 2), (13, 15, 1)]}
    (function,) = sr.parse_disassembly(NVDISASM)
    chains = {i.address: i.chain for i in function.instructions}
    assert chains[0x20] == (("k.cuh", 5), ("k.cuh", 4))
    assert chains[0x30] == chains[0x20]  # the chain holds until the next line info
    assert sr.pass_of(function.instructions[2], regions) == 1
    branch = next(i for i in function.instructions if i.base == "BRX")
    assert branch.targets == (0x80, 0xA0) and not branch.conditional
    loops, how = sr.hot_loops(function, row_info(k=2, vec=1), regions, [])
    assert how == "lineinfo"
    # team_lse's loop at 0xc0 has LDS and MUFU but belongs to no pass
    found = [(h.loop.header, h.pass_, h.way, h.instructions) for h in loops]
    assert found == [(0x10, 1, "global", 4), (0x50, 2, "global", 7)]


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
    assert sr.budget_for("pairwise", "default") == sr.BUDGETS[("pairwise", "default")]
    assert sr.budget_for("pairwise", "T!=1,smoothing") == sr.BUDGETS[("pairwise", "T!=1")]
    assert sr.budget_for("ensemble", "default") is None
    assert sr.budget_for("pairwise", "smoothing") is None
    assert sr.budget_for("pairwise", "default,scalar") is None
    assert sr.budget_for("any", "runtime") is None


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
