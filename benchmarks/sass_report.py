"""A static performance report of the GPU kernels: their SASS for sm_90, read without a GPU.

Timings need a GPU, which CI does not have; the machine code the compilers make does not. This
report compiles the CUDA translation units (csrc/mutual_loss_cuda_{float32,bfloat16,float16,
float64}.cu) for sm_90 only, with setup.py's nvcc flags and -lineinfo, and the Triton kernel's
specializations (kernels/mutual_loss.py) with Triton, finds each kernel's hot loops in the
disassembly and counts their instructions per logit element. It fails when a hot loop spills, a
row kernel exceeds its budget (BUDGETS) or a budgeted row kernel has a barrier in a hot loop, so
that a change that bloats the inner loops shows in CI before anyone times it.

    python -m benchmarks.sass_report [--jobs N] [--backends cuda triton]
        [--out benchmarks/results/sass_sm90.json] [--markdown BENCHMARKS.md] [--no-check]

For CUDA it needs nvcc ($NVCC, else PATH, else /usr/local/cuda/bin/nvcc), cuobjdump and nvdisasm
(the toolkit's, else those Triton bundles) and c++filt (else the toolkit's cu++filt). The sources
are copied to a temporary folder first, so that the line info and the sources read match even if
csrc/ changes during the run. Per translation unit: nvcc -c (with -Xptxas -v: spill stores),
cuobjdump -res-usage (registers, stack, shared and local memory), cuobjdump -xelf all (the cubin),
nvdisasm -c -gi (the SASS with line and inlining info and the targets of indirect branches).

Triton. The specializations the op launches (triton_jobs: kernel_launches of fastdml.kernels with
meta tensors, at the shapes TRITON_*SHAPE, through benchmarks/triton_compile.py) are compiled by
Triton for sm_90 with the options the op passes (warps, registers); their cubin goes through
Triton's bundled cuobjdump (registers, local memory), ptxas -v where there is a stack frame (spill
stores) and nvdisasm -c -gi, then the same loops and passes as below. Their line info has no
inlining chain: an instruction carries the line of the innermost function it comes from, so the
regions are the functions that hold a tile's arithmetic, `_fold_lse` (pass 1) and `_emit_tile`
(pass 2), found with ast. Their loops stream (the global way), one vector of every peer a thread:
K * VEC elements an iteration. A row kernel's mode and path are named as the CUDA kernels' (the
path from its options, ",scalar" where VEC = 1; the loss family's paths are named in
TRITON_FAMILY, and their pass 2 adds the loops of pass 3 where there is one); the split's kernels
are split_stats, split_emit, split_grad and split_finish, the backward's scale_grad; `demangled`
is the specialization (constexprs, warps, registers, pointer types). Triton's budget covers the
16- and 32-bit floats.

Rows of the backends not compiled in a run (--backends) are kept from --out, so the JSON and the
section of BENCHMARKS.md stay whole.

Hot loops. The control-flow graph of each kernel is built from its branches (BRA, BRX with the
targets nvdisasm infers, EXIT, RET; CALL falls through); a loop is a natural loop (a back edge
u -> h where h dominates u; the back edges to one header make one loop), so that a jump back from
out-of-line code (a shuffle's divergent fallback) is no loop, and the out-of-line parts of a loop's
body count as its body. The innermost loops (no other loop's header in the body) that access
global or shared memory (LDG, LDS, STS, STG) are the candidates. Instructions are counted
statically, NOPs excluded: every block of the body, including the rarely taken ones (the label
class, an all -inf row); a CALL counts as one instruction (the division slow paths it calls do
not count).

Passes. With line info, an instruction belongs to the innermost source region of PASS_REGIONS on
its inlining chain (of the innermost frame in one; code a region calls, such as for_each_lse, is
the caller's, and `fold` inlined into `cache_and_fold` stays `fold`'s): the lambdas `fold`,
`cache_and_fold`, `cache_and_max` and `add_at_max` (pass 1) and `emit` (pass 2) of
mutual_loss_kernel, the functions `block_stats` (pass 1) and `block_emit` (pass 2) of the any-K and
split kernels; the regions are found in the copied sources (a lambda
`auto NAME = [...](...) {...}`, else a function definition `NAME(...) {...}`). A candidate loop is
in the pass most of its instructions are attributed to, and its region is the commonest of that
pass's regions among them that fix a way (PASS_REGIONS), else the commonest; where some candidate
of a kernel is attributed, the unattributed ones (the weights' copy, the rows' count, the loss's
reduction) are not hot. Without attribution (a region renamed, no line info), a heuristic: in a row
kernel only loops with MUFU (every logit costs an exp; the copies and the reduction have none) that
read global memory or move data between shared and global memory (LDG, or LDS or STS with STG; not
a loop over a reduction's shared scratch) are hot; a loop with STS is pass 1 (it fills the row
cache), one with STG, or LDS and no STS, pass 2 (the gradient; the cached logits), and a loop with
LDG alone is pass 1 when it comes before the first pass-2 loop by address, else pass 2. So without
line info, pass 2 of a kernel without the gradient is found in its streamed way only, and the
cluster way not at all (its loops have no MUFU or touch shared memory only: the heuristic leaves
them out). Both are computed; where the heuristic finds a loop the line info attributes and they
disagree on its pass, the report warns. Other kernels: every candidate that touches data is pass 1
unless attributed.

Ways. In mutual_loss_kernel a row's logits go one of three ways. Through the shared-memory cache
("cache": pass 1 `cache_and_fold` with STS, pass 2 `emit` reading LDS), streamed from global memory
("global": pass 1 `fold` and pass 2 `emit` with LDG), or, in the sm_90 cluster path (the kernels
with kClustered: each CTA of a cluster holds a chunk of the row in shared memory), "cluster": pass
1 is two loops over every element, `cache_and_max` with LDG and STS, the maxima, then `add_at_max`
reading LDS, the sums at the maxima; pass 2 is the cache way's `emit` over LDS. A region of
`cache_and_fold`, `cache_and_max` or `add_at_max` fixes its loop's way; the other loops are on the
cache way when they access shared memory (pass 1: STS; pass 2: no LDG), else on the global one. A
way's instructions per element are pass 1's plus pass 2's, a pass's the sum over its regions of
their steady-state loop's (a pass without a loop of its way takes its other way's, the cluster
way's pass 2 the cache way's); the row's is the largest of the ways, and pass1_per_element and
pass2_per_element are that way's; cluster_per_element is the cluster way's (null in a kernel
without its pass-1 loops: all but the cluster kernels). Within a pass, a way and a region, the
steady-state loop is the one with the most elements per iteration (a remainder loop has fewer); of
several such (a loop versioned on a run-time option) the one with the most instructions per element
counts.

Elements per iteration: the logit elements one thread processes per iteration, derived from the
loop's memory accesses: the bytes its LDG load, else those its STG store (the gradient, one element
each), else those of its LDS of exactly one vector (VEC elements), divided by the element size. For
mutual_loss_kernel<S, KT, VEC, ...> this must be a multiple of KT * VEC (one vector per peer); the
template gives KT * VEC * B for the batched loops of for_each_vector (B = BatchOf: 2 for KT <= 2,
else 1; the loops with LDG) and KT * VEC for the loops over the cache (pass 2's, add_at_max's),
unless the compiler unrolls further. The derived count is used when it is a positive multiple of
KT * VEC; otherwise the template's, with a warning; a derived count that is a multiple but differs
from the template's is also warned about (the compiler unrolled, or the source changed), except in
the cluster way (the compiler unrolls its light loops: cache_and_max takes no exp). For the other
kernels the element is the loaded value (a logit) and their innermost loops may be loops over peers
within a class: their counts are coarse, not comparable with the row kernel's.

Names: the kernel's demangled template arguments (c++filt). mutual_loss_kernel<S, KT, VEC> (all
options tested at run time) and mutual_loss_kernel<S, KT, VEC, RuntimeOptions> have mode "any"
and path "runtime"; mutual_loss_kernel<S, KT, VEC, FixedOptions<LossMode::M, kUnitT, kSmoothing,
kGrad>> has mode M (pairwise, ensemble, ensemble_logits, weights) and the path of its options,
"default" when they are the op's defaults (T = 1, no smoothing, the gradient; in any mode: the
mode is a column of its own), else the ones that differ joined by commas ("T!=1", "smoothing",
"no_grad"); kClustered, the fifth argument, when true (the kernel launched in clusters) adds
",cluster", and VEC == 1 (the unaligned scalar fallback) ",scalar". The other kernels' path is
their role (ROLES), their mode "any" and their K null.

Checks (skipped with --no-check): a hot loop with local-memory accesses (LDL, STL), except in the
kernels that read no logits (WITHOUT_LOGITS); a row kernel without a pass-1 or a pass-2 loop;
a budget exceeded (BUDGETS, by backend, mode and path: pairwise only, so far); a barrier (BAR) in
a hot loop of a budgeted row kernel (loop_barriers). Spills outside the hot loops are reported
(spill_bytes, from ptxas -v), not failed. Writes the JSON (a list of rows, one per kernel, with
the compiler that made it) and the markdown section of BENCHMARKS.md between its markers, prints
a summary, and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import ast
import glob
import itertools
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16", "float16", "float64")
ARCH = "sm_90"
GENCODE = ["-gencode", "arch=compute_90,code=sm_90"]
# Instructions per logit element (pass 1 + pass 2) a row kernel may take, by backend, mode and
# path: "default" for the default options, "T!=1" for every path with a temperature (see
# budget_for). Triton's in 16- and 32-bit floats (TRITON_BUDGETED_DTYPES): its float64
# exponentials are library calls.
BUDGETS: dict[tuple[str, str, str], float] = {
    ("cuda", "pairwise", "default"): 30,
    ("cuda", "pairwise", "T!=1"): 40,
    ("triton", "pairwise", "default"): 35,
}
TRITON_BUDGETED_DTYPES = ("float32", "bfloat16", "float16")
# Source regions whose code is pass 1 or pass 2 of a row, and the way a loop of theirs is on
# (None: its memory accesses tell; see the module's docstring). The last two are the Triton
# kernel's functions (kernels/mutual_loss.py), whose line info has no inlining chain: the body of
# a pass-1 tile and of a pass-2 tile.
PASS_REGIONS: dict[str, tuple[int, str | None]] = {
    "fold": (1, None),
    "cache_and_fold": (1, "cache"),
    "cache_and_max": (1, "cluster"),
    "add_at_max": (1, "cluster"),
    "emit": (2, None),
    "block_stats": (1, None),
    "block_emit": (2, None),
    "_fold_lse": (1, None),
    "_emit_tile": (2, None),
}
WAYS = ("cache", "global", "cluster")
ROW_KERNEL = "mutual_loss_kernel"
TRITON_ROW_KERNEL = "_mutual_loss_kernel"
BACKENDS = ("cuda", "triton")
ROLES = {
    "mutual_loss_any_k_kernel": "any_k",
    "split_stats_kernel": "split_stats",
    "split_emit_kernel": "split_emit",
    "split_finish_kernel": "split_finish",
    "scale_grad_kernel": "scale_grad",
}
# Kernels whose loops read no logits (loss terms): local memory there is no failure.
WITHOUT_LOGITS = ("split_finish",)
MODES = ("pairwise", "ensemble", "ensemble_logits", "weights")
MODE_NAMES = {"pairwise": 0, "ensemble": 1, "ensemblelogits": 2, "weights": 3}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
MARKERS = ("<!-- sass_report: begin -->", "<!-- sass_report: end -->")
SECTION = "## GPU kernels, static (SASS, sm_90)"

# ---------------------------------------------------------------------------------------------
# Disassembly: cuobjdump -sass (branch targets as addresses) or nvdisasm (labels, line info).

_FUNCTION = re.compile(r"^\s*(?:Function : (\S+)|\.text\.(\S+):)\s*$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+([^;]*?)\s*;(.*)$")
_LABEL = re.compile(r"^([.$\w][\w.$]*):\s*$")
_LINE_INFO = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_GUARD = re.compile(r"^@(!?)(U?P(?:T|\d+))\s+")
_TARGET = re.compile(r"`\(([^)]+)\)|\b(0x[0-9a-fA-F]+)\b")
_BRANCH_TARGETS = re.compile(r'BRANCH_TARGETS ([^"]+)"')
BRANCHES = {"BRA", "BRX", "JMP", "JMX"}
TERMINATORS = {"EXIT", "RET", "KILL", "BPT"}


@dataclass
class Instruction:
    address: int
    opcode: str  # "LDG.E.128", without the guard
    text: str  # the whole instruction, guard included
    conditional: bool  # guarded by a predicate other than PT (or a BRA with a condition)
    targets: tuple = ()  # branch or call targets: addresses, or labels until resolved
    chain: tuple = ()  # the line info: (file basename, line) from the innermost frame out

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Function:
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def _instruction(address: int, text: str, tail: str) -> Instruction:
    annotation = text.find("(*")  # nvdisasm: (*"BRANCH_TARGETS .L_x_1,.L_x_2"*) ;
    if annotation >= 0:
        text, tail = text[:annotation].rstrip(), text[annotation:] + tail
    guard = _GUARD.match(text)
    body = text[guard.end() :] if guard else text
    opcode, _, operands = body.partition(" ")
    conditional = bool(guard) and not (guard[1] == "" and guard[2] in ("PT", "UPT"))
    if guard and guard[1] == "!" and guard[2] in ("PT", "UPT"):
        opcode = "NOP"  # never runs
    targets: tuple = ()
    base = opcode.split(".")[0]
    if base in BRANCHES or base == "CALL":
        found = [label or int(number, 16) for label, number in _TARGET.findall(operands)]
        if base in ("BRX", "JMX"):
            listed = _BRANCH_TARGETS.search(tail)
            found = [t.strip() for t in listed[1].split(",")] if listed else []
        elif found:
            found = found[-1:]
        targets = tuple(found)
        # BRA P0, X / BRA.DIV UR4, X: a condition among the operands
        if base == "BRA" and ("," in operands or opcode.startswith("BRA.DIV")):
            conditional = True
    return Instruction(address, opcode, text, conditional, targets)


def parse_disassembly(text: str) -> list[Function]:
    """Every function of a cuobjdump -sass or nvdisasm listing, its branch targets resolved to
    addresses and (nvdisasm -gi) each instruction's inlining chain."""
    functions: list[Function] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    chain: tuple = ()
    new_chain: list[tuple[str, int]] = []
    current: Function | None = None

    def finish() -> None:
        if current is None:
            return
        for label in pending:
            labels[label] = current.instructions[-1].address + 16 if current.instructions else 0
        for ins in current.instructions:
            ins.targets = tuple(labels.get(t, -1) if isinstance(t, str) else t for t in ins.targets)

    for line in text.splitlines():
        found = _FUNCTION.match(line)
        if found:
            finish()
            current = Function(found[1] or found[2])
            functions.append(current)
            labels, pending, chain, new_chain = {}, [], (), []
            continue
        if current is None:
            continue
        found = _INSTRUCTION.match(line)
        if found:
            if new_chain:
                chain, new_chain = tuple(new_chain), []
            ins = _instruction(int(found[1], 16), found[2].strip(), found[3])
            ins.chain = chain
            current.instructions.append(ins)
            for label in pending:
                labels[label] = ins.address
            pending = []
            continue
        found = _LINE_INFO.match(line)
        if found:
            new_chain.append((os.path.basename(found[1]), int(found[2])))
            continue
        found = _LABEL.match(line)
        if found and not line.startswith((" ", "\t")):
            pending.append(found[1])
    finish()
    return functions


# ---------------------------------------------------------------------------------------------
# Control flow: basic blocks, dominators, natural loops.


@dataclass
class Loop:
    header: int  # address of the header's first instruction
    instructions: list[Instruction]

    @property
    def opcodes(self) -> Counter:
        return Counter(i.opcode for i in self.instructions)

    def count(self, *bases: str) -> int:
        return sum(1 for i in self.instructions if i.base in bases)


def _blocks(ins: list[Instruction]) -> tuple[list[tuple[int, int]], list[list[int]], list[int]]:
    """Basic blocks as [start, end) instruction indices, their successors, and the blocks entered
    from outside (the function's start, call targets)."""
    index = {i.address: n for n, i in enumerate(ins)}
    leaders = {0}
    calls = set()
    for n, i in enumerate(ins):
        targets = [index[t] for t in i.targets if t in index]
        if i.base == "CALL":
            calls.update(targets)
            leaders.update(targets)
        elif i.base in BRANCHES:
            leaders.update(targets)
            leaders.add(n + 1)
        elif i.base in TERMINATORS:
            leaders.add(n + 1)
    starts = sorted(s for s in leaders if s < len(ins))
    spans = list(zip(starts, starts[1:] + [len(ins)], strict=True))
    block_of = {start: b for b, (start, _) in enumerate(spans)}
    successors: list[list[int]] = []
    for b, (_, end) in enumerate(spans):
        last = ins[end - 1]
        following = [b + 1] if b + 1 < len(spans) else []
        if last.base in BRANCHES:
            out = [block_of[index[t]] for t in last.targets if t in index]
            out += following if last.conditional else []
        elif last.base in TERMINATORS:
            out = following if last.conditional else []
        else:
            out = following
        successors.append(sorted(set(out)))
    entries = sorted({0, *(block_of[c] for c in calls)}) if spans else []
    return spans, successors, entries


def _dominators(successors: list[list[int]], entries: list[int]) -> list[int]:
    """Immediate dominators (Cooper, Harvey and Kennedy) from a virtual root, -1, that precedes
    the entries; -2 for a block not reachable."""
    n = len(successors)
    order: list[int] = []  # postorder, iteratively
    seen = [False] * n
    for entry in entries:
        if seen[entry]:
            continue
        seen[entry] = True
        stack = [(entry, iter(successors[entry]))]
        while stack:
            node, children = stack[-1]
            for child in children:
                if not seen[child]:
                    seen[child] = True
                    stack.append((child, iter(successors[child])))
                    break
            else:
                order.append(node)
                stack.pop()
    rank = {node: r for r, node in enumerate(order)}
    rank[-1] = len(order)
    predecessors: list[list[int]] = [[] for _ in range(n)]
    for node, outs in enumerate(successors):
        for out in outs:
            predecessors[out].append(node)
    for entry in entries:
        predecessors[entry].append(-1)
    idom = {-1: -1}

    def intersect(a: int, b: int) -> int:
        while a != b:
            while rank[a] < rank[b]:
                a = idom[a]
            while rank[b] < rank[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for node in reversed(order):
            new = None
            for pred in predecessors[node]:
                if pred in idom:
                    new = pred if new is None else intersect(pred, new)
            if new is not None and idom.get(node) != new:
                idom[node] = new
                changed = True
    return [idom.get(node, -2) for node in range(n)]


def find_loops(function: Function) -> list[Loop]:
    """The innermost natural loops of a function, by header address."""
    ins = function.instructions
    if not ins:
        return []
    spans, successors, entries = _blocks(ins)
    idom = _dominators(successors, entries)

    def dominates(a: int, b: int) -> bool:
        while b >= 0:
            if a == b:
                return True
            b = idom[b] if idom[b] != b else -1
        return False

    predecessors: list[list[int]] = [[] for _ in spans]
    for node, outs in enumerate(successors):
        for out in outs:
            predecessors[out].append(node)
    bodies: dict[int, set[int]] = {}
    for node, outs in enumerate(successors):
        if idom[node] == -2:
            continue
        for header in outs:
            if dominates(header, node):
                body = bodies.setdefault(header, {header})
                stack = [node]
                while stack:
                    block = stack.pop()
                    if block not in body:
                        body.add(block)
                        stack.extend(predecessors[block])
    loops = []
    for header, body in sorted(bodies.items()):
        if any(other != header and other in body for other in bodies):
            continue  # holds another loop
        members = [i for b in sorted(body) for i in ins[spans[b][0] : spans[b][1]]]
        members = [i for i in members if i.base != "NOP"]
        loops.append(Loop(ins[spans[header][0]].address, members))
    return loops


# ---------------------------------------------------------------------------------------------
# Source regions of the passes.

# Per file basename, the (first line, last line, name) of each region found.
Regions = dict[str, list[tuple[int, int, str]]]


def _blank_comments(source: str) -> str:
    """The source with comments and string literals blanked (line numbers kept)."""

    def blank(match: re.Match) -> str:
        return re.sub(r"[^\n]", " ", match[0])

    pattern = r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''
    return re.sub(pattern, blank, source, flags=re.S)


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """The index of the bracket that closes the one at `start`; -1 if none."""
    depth = 0
    for n in range(start, len(text)):
        if text[n] == open_:
            depth += 1
        elif text[n] == close:
            depth -= 1
            if depth == 0:
                return n
    return -1


def _body_after(text: str, paren: int) -> int | None:
    """The '{' of a definition whose parameter list opens at `paren`; None for a call or a
    declaration."""
    end = _matching(text, paren, "(", ")")
    if end < 0:
        return None
    tail = re.match(
        r"\s*(?:(?:const|mutable|noexcept|constexpr)\s*)*(?:->[^{;()]*)?\{", text[end + 1 :]
    )
    return end + tail.end() if tail else None


def source_regions(sources: dict[str, str]) -> Regions:
    """Per file basename, the (first line, last line, name) of each region of PASS_REGIONS: the
    lambdas of that name, else the functions of that name defined there."""
    regions: Regions = {}
    for path, source in sources.items():
        text = _blank_comments(source)

        def line(offset: int, text: str = text) -> int:
            return text.count("\n", 0, offset) + 1

        found: list[tuple[int, int, str]] = []
        for name in PASS_REGIONS:
            spans = []
            for lam in re.finditer(rf"\bauto\s+{name}\s*=\s*\[", text):
                close = _matching(text, lam.end() - 1, "[", "]")
                paren = text.find("(", close)
                brace = _body_after(text, paren) if close > 0 and paren > 0 else None
                if brace is not None:
                    spans.append((line(lam.start()), line(_matching(text, brace, "{", "}"))))
            if not spans:
                for fn in re.finditer(rf"(?<![\w.>:]){name}\s*\(", text):
                    brace = _body_after(text, fn.end() - 1)  # a call has no body
                    if brace is not None:
                        spans.append((line(fn.start()), line(_matching(text, brace, "{", "}"))))
            found += [(first, last, name) for first, last in spans]
        if found:
            regions[os.path.basename(path)] = found
    return regions


def region_of(ins: Instruction, regions: Regions) -> str | None:
    """The innermost region on an instruction's inlining chain, if any: of the innermost frame in
    one, the region nested deepest there. So code a region calls (for_each_lse, itself none) is
    the caller's: fold's in fold, add_at_max's in add_at_max; fold's inlined into cache_and_fold
    is fold's."""
    for file, line in ins.chain:
        around = [
            (first, name) for first, last, name in regions.get(file, ()) if first <= line <= last
        ]
        if around:
            return max(around)[1]
    return None


# ---------------------------------------------------------------------------------------------
# Kernel names.


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a template argument list."""
    args, depth, start = [], 0, 0
    for n, char in enumerate(text):
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[start:n].strip())
            start = n + 1
    tail = text[start:].strip()
    return args + [tail] if tail else args


def parse_name(demangled: str) -> tuple[str, list[str]]:
    """(base name, template arguments) of a demangled kernel name."""
    text = demangled.replace("(anonymous namespace)", "{anonymous}")
    depth = 0
    for n, char in enumerate(text):  # the parameter list opens at angle depth 0
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0:
            text = text[:n]
            break
    last, depth, start = text, 0, 0
    for n, char in enumerate(text):
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        elif text.startswith("::", n) and depth == 0:
            start = n + 2
    last = text[start:].strip()
    if "<" not in last:
        return last, []
    base, _, rest = last.partition("<")
    return base.strip(), _split_args(rest[: rest.rindex(">")])


def _bool(arg: str) -> bool:
    value = arg.strip().rsplit(")", 1)[-1].strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ValueError(f"not a bool template argument: {arg!r}")


def _mode(arg: str) -> str:
    """LossMode::M as c++filt spells it: (fastdml::gpu::LossMode)0, or by name."""
    found = re.fullmatch(r"\(([^)]*)\)\s*(\d+)", arg.strip())
    if found:
        return MODES[int(found[2])]
    name = arg.strip().rsplit("::", 1)[-1].lower().replace("_", "").lstrip("k")
    if name in MODE_NAMES:
        return MODES[MODE_NAMES[name]]
    raise ValueError(f"not a LossMode template argument: {arg!r}")


@dataclass(frozen=True)
class KernelInfo:
    base: str
    dtype: str  # of the logits (the translation unit's)
    K: int | None
    vec: int | None
    mode: str
    path: str
    backend: str = "cuda"

    @property
    def row_kernel(self) -> bool:
        return self.base in (ROW_KERNEL, TRITON_ROW_KERNEL)


def kernel_info(demangled: str, dtype: str) -> KernelInfo:
    """Mode and path of a kernel from its demangled name (see the module's docstring)."""
    base, args = parse_name(demangled)
    if base != ROW_KERNEL:
        role = ROLES.get(base, base)
        vec = None
        if base == "scale_grad_kernel" and len(args) >= 2 and args[1].strip().isdigit():
            vec = int(args[1])
            role += ",scalar" if vec == 1 else ""
        return KernelInfo(base, dtype, None, vec, "any", role)
    k, vec = int(args[1]), int(args[2])
    opts = args[3] if len(args) > 3 else "RuntimeOptions"
    if "FixedOptions" in opts:
        inner = _split_args(opts[opts.index("<") + 1 : opts.rindex(">")])
        mode = _mode(inner[0])
        unit_t, smoothing, grad = (_bool(a) for a in inner[1:4])
        parts = [] if unit_t else ["T!=1"]
        parts += ["smoothing"] if smoothing else []
        parts += [] if grad else ["no_grad"]
        path = ",".join(parts) or "default"
    else:
        mode, path = "any", "runtime"
    if len(args) > 4 and _bool(args[4]):
        path += ",cluster"
    if vec == 1:
        path += ",scalar"
    return KernelInfo(base, dtype, k, vec, mode, path)


def budget_for(mode: str, path: str, backend: str = "cuda", dtype: str = "float32") -> float | None:
    """The budget of a row kernel (BUDGETS): by its backend, its mode and "default" for the
    default options, "T!=1" for any path with a temperature, the cluster kernels' as the others';
    none for the other paths, the run-time one, the unaligned scalar fallback and Triton's
    float64."""
    parts = [part for part in path.split(",") if part != "cluster"]
    if "scalar" in parts or "runtime" in parts:
        return None
    if backend == "triton" and dtype not in TRITON_BUDGETED_DTYPES:
        return None
    if parts == ["default"]:
        return BUDGETS.get((backend, mode, "default"))
    if "T!=1" in parts:
        return BUDGETS.get((backend, mode, "T!=1"))
    return None


def row_budget(row: dict) -> float | None:
    return budget_for(row["mode"], row["path"], row["backend"], row["dtype"])


# ---------------------------------------------------------------------------------------------
# Loops of a kernel: hot ones, their pass, way and elements.

MEMORY = ("LDG", "STG", "LDS", "STS")


def width(opcode: str) -> int:
    """Bytes one memory instruction accesses per thread."""
    parts = opcode.split(".")[1:]
    for part, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if part in parts:
            return size
    return 4


def _bytes(loop: Loop, base: str, only: int | None = None) -> int:
    sizes = (width(i.opcode) for i in loop.instructions if i.base == base)
    return sum(s for s in sizes if only is None or s == only)


@dataclass
class HotLoop:
    loop: Loop
    pass_: int
    way: str  # "cache" (through shared memory), "global" or "cluster" (a resident chunk)
    elements: int
    region: str | None = None  # of PASS_REGIONS; None without line info

    @property
    def instructions(self) -> int:
        return len(self.loop.instructions)

    @property
    def per_element(self) -> float:
        return self.instructions / self.elements

    @property
    def mufu(self) -> int:
        return self.loop.count("MUFU")


def _touches_data(loop: Loop) -> bool:
    """Whether a loop reads global memory, or moves data between shared and global memory (not
    a loop over a reduction's shared scratch)."""
    return bool(loop.count("LDG") or (loop.count("STG") and loop.count("LDS", "STS")))


def _heuristic_passes(loops: list[Loop]) -> list[int]:
    """Pass 1 or 2 of a row kernel's hot loops without line info (see the module's docstring)."""
    passes = []
    for loop in loops:
        if loop.count("STS"):
            passes.append(1)
        elif loop.count("STG") or loop.count("LDS"):
            passes.append(2)
        else:
            passes.append(0)
    seconds = [loop.header for loop, p in zip(loops, passes, strict=True) if p == 2]
    first_second = min(seconds) if seconds else None
    undecided = [n for n, p in enumerate(passes) if p == 0]
    for n in undecided:
        if first_second is not None:
            passes[n] = 1 if loops[n].header < first_second else 2
        else:  # no gradient and no cache: the last by address is pass 2
            passes[n] = 2 if len(undecided) > 1 and n == undecided[-1] else 1
    return passes


def _elements(loop: Loop, way: str, info: KernelInfo, warnings: list[str]) -> int:
    item = element_size(info)
    derived = _bytes(loop, "LDG") or _bytes(loop, "STG")
    if not derived and info.vec:
        derived = _bytes(loop, "LDS", info.vec * item)
    derived //= item
    if not info.row_kernel:
        return max(derived, 1)
    unit = info.K * info.vec
    # The CUDA kernels' for_each_vector batches loads (else the cache's loops); Triton's tiles
    # take one vector of each peer a thread.
    batch = 2 if info.backend == "cuda" and info.K <= 2 and loop.count("LDG") else 1
    expected = unit * batch
    where = f"{info.dtype} K={info.K} VEC={info.vec} {info.path} loop {loop.header:#x}"
    if derived <= 0 or derived % unit:
        warnings.append(
            f"{where}: {derived} elements from its loads and stores, not a multiple of "
            f"KT*VEC = {unit}: using the template's {expected}"
        )
        return expected
    # The compiler unrolls the cluster way's loops, and Triton's loops as it likes.
    if derived != expected and way != "cluster" and info.backend == "cuda":
        warnings.append(f"{where}: {derived} elements per iteration, the template gives {expected}")
    return derived


def element_size(info: KernelInfo) -> int:
    return ITEMSIZE[info.dtype]


def _attributed(counts: Counter) -> tuple[int, str]:
    """The pass and region of a loop from its instructions' regions: the pass most of them are
    in; of that pass's regions, the commonest that fixes a way, else the commonest."""
    passes: Counter = Counter()
    for name, n in counts.items():
        passes[PASS_REGIONS[name][0]] += n
    pass_ = passes.most_common(1)[0][0]
    names = [name for name, _ in counts.most_common() if PASS_REGIONS[name][0] == pass_]
    fixing = [name for name in names if PASS_REGIONS[name][1]]
    return pass_, (fixing or names)[0]


def hot_loops(
    function: Function,
    info: KernelInfo,
    regions: Regions,
    warnings: list[str],
) -> tuple[list[HotLoop], str]:
    """The hot loops of a kernel with their pass, way, elements per iteration and region, and how
    the passes were told apart ("lineinfo" or "heuristic")."""
    candidates = [loop for loop in find_loops(function) if any(loop.count(base) for base in MEMORY)]
    votes = [
        Counter(filter(None, (region_of(i, regions) for i in loop.instructions)))
        for loop in candidates
    ]
    by_lines = any(votes)
    chosen: list[tuple[Loop, int, str | None]] = []
    if by_lines:
        chosen = [(loop, *_attributed(v)) for loop, v in zip(candidates, votes, strict=True) if v]
    elif not info.row_kernel:
        chosen = [(loop, 1, None) for loop in candidates if _touches_data(loop)]
    if info.row_kernel:
        logits = [loop for loop in candidates if _touches_data(loop) and loop.count("MUFU")]
        guessed = dict(zip(map(id, logits), _heuristic_passes(logits), strict=True))
        if not by_lines:
            chosen = [(loop, guessed[id(loop)], None) for loop in logits]
        else:
            for loop, pass_, _ in chosen:
                if guessed.get(id(loop), pass_) != pass_:
                    warnings.append(
                        f"{function.name}: loop {loop.header:#x} is pass {pass_} by its line "
                        f"info, pass {guessed.get(id(loop))} by the heuristic"
                    )
    found = []
    for loop, pass_, region in chosen:
        way = PASS_REGIONS[region][1] if region else None
        if way is None and pass_ == 1:
            way = "cache" if loop.count("STS") else "global"
        elif way is None:
            way = "global" if loop.count("LDG") else "cache"
        found.append(HotLoop(loop, pass_, way, _elements(loop, way, info, warnings), region))
    return found, "lineinfo" if by_lines else "heuristic"


def _steady(loops: list[HotLoop], every: bool = False) -> list[HotLoop]:
    """The steady-state loop of several: the most elements, then the most instructions each; or,
    `every`, all the loops of the most elements (Triton's kernel has no versioned loops: each
    runs, as pass 3 of the divergences other than KL, a second loop of `_emit_tile`)."""
    if not loops:
        return []
    most = max(h.elements for h in loops)
    if every:
        return [h for h in loops if h.elements == most]
    return [max(loops, key=lambda h: (h.elements, h.per_element))]


def ways(
    loops: list[HotLoop], every: bool = False
) -> dict[str, tuple[list[HotLoop], list[HotLoop]]]:
    """Per way, the loops that count for its pass 1 and pass 2: the steady-state loop of each
    region (a pass's regions run one after the other for every element; `every`: see _steady);
    a pass without loops of its way takes its other way's. The cluster way only where it has
    pass-1 loops; its pass 2 is the cache way's."""
    own: dict[tuple[int, str], list[HotLoop]] = {}
    for pass_ in (1, 2):
        for way in WAYS:
            by_region: dict[str | None, list[HotLoop]] = {}
            for h in loops:
                if h.pass_ == pass_ and h.way == way:
                    by_region.setdefault(h.region, []).append(h)
            own[pass_, way] = [h for group in by_region.values() for h in _steady(group, every)]
    found = {
        way: (own[1, way] or own[1, other], own[2, way] or own[2, other])
        for way, other in (("cache", "global"), ("global", "cache"))
    }
    if own[1, "cluster"]:
        found["cluster"] = (own[1, "cluster"], found["cache"][1])
    return found


def _total(loops: list[HotLoop]) -> float:
    return sum(h.per_element for h in loops)


def _per_element(loops: list[HotLoop]) -> float | None:
    return round(_total(loops), 2) if loops else None


def summarize(loops: list[HotLoop], every: bool = False) -> dict:
    """Per-element instructions and MUFU of both passes along the costliest way, and the cluster
    way's instructions (`every`: see _steady)."""
    found = ways(loops, every)
    first, second = max(found.values(), key=lambda way: sum(map(_total, way)))
    both = first + second
    cluster = found.get("cluster")
    return {
        "instructions_per_element": _per_element(both),
        "pass1_per_element": _per_element(first),
        "pass2_per_element": _per_element(second),
        "cluster_per_element": _per_element(cluster[0] + cluster[1]) if cluster else None,
        "mufu_per_element": round(sum(h.mufu / h.elements for h in both), 3) if both else None,
    }


# ---------------------------------------------------------------------------------------------
# Tools and compilation.


def find_nvcc() -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc and os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if not nvcc:
        raise SystemExit(
            "sass_report: nvcc not found ($NVCC, PATH, /usr/local/cuda/bin/nvcc): install the "
            "CUDA toolkit or set NVCC"
        )
    return nvcc


def find_tool(name: str, nvcc: str) -> str:
    """The toolkit's `name` (on PATH, beside nvcc, in nvcc's TOP), else the one Triton bundles."""
    candidates = [shutil.which(name), os.path.join(os.path.dirname(os.path.realpath(nvcc)), name)]
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
        if top:
            candidates.append(os.path.join(top[1].strip(), "bin", name))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import triton

        bundled = os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name
        candidates.append(os.path.join(*bundled))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SystemExit(f"sass_report: no {name} in the CUDA toolkit nor in Triton's bundle")


def nvcc_flags() -> list[str]:
    """setup.py's nvcc flags, read as .ci/compile_cuda.sh reads them."""
    return list(runpy.run_path(str(ROOT / "setup.py"), run_name="fastdml_setup")["nvcc_flags"]())


def demangle(names: Iterable[str], nvcc: str) -> dict[str, str]:
    names = sorted(set(names))
    for tool in ("c++filt", "cu++filt"):
        path = shutil.which(tool) or os.path.join(os.path.dirname(os.path.realpath(nvcc)), tool)
        if not os.path.isfile(path):
            continue
        out = subprocess.run([path], input="\n".join(names), capture_output=True, text=True)
        lines = out.stdout.splitlines()
        if out.returncode == 0 and len(lines) == len(names):
            return dict(zip(names, lines, strict=True))
    raise SystemExit("sass_report: neither c++filt nor cu++filt could demangle the kernel names")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage: per function, REG, STACK, SHARED and LOCAL."""
    usage = {}
    pattern = r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)"
    for name, reg, stack, shared, local in re.findall(pattern, text):
        usage[name] = dict(
            registers=int(reg), stack=int(stack), shared=int(shared), local=int(local)
        )
    return usage


def parse_ptxas(text: str) -> dict[str, tuple[int, int]]:
    """ptxas -v: per function, (spill store bytes, spill load bytes)."""
    pattern = (
        r"Function properties for (\S+)\s*\n\s*\d+ bytes stack frame, "
        r"(\d+) bytes spill stores, (\d+) bytes spill loads"
    )
    return {name: (int(out), int(back)) for name, out, back in re.findall(pattern, text)}


@dataclass
class Unit:
    """One translation unit's compile and disassembly."""

    dtype: str
    source: str
    folder: str
    nvcc: str
    flags: list[str]
    cuobjdump: str
    nvdisasm: str
    regions: Regions
    compiler: str  # nvcc's version


def _run(command: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return done


def analyze_unit(unit: Unit) -> dict:
    """Compiles a translation unit for sm_90 and reads its kernels (in a worker process): its rows,
    warnings, and the seconds its compile took; or the error."""
    start = time.perf_counter()
    out: dict = dict(dtype=unit.dtype, warnings=[])
    try:
        obj = os.path.join(unit.folder, f"{unit.dtype}.o")
        command = [unit.nvcc, "-c", *unit.flags, "-lineinfo", "-Xptxas", "-v", *GENCODE]
        compiled = _run([*command, unit.source, "-o", obj])
        out["compile_seconds"] = round(time.perf_counter() - start, 1)
        spills = parse_ptxas(compiled.stdout + compiled.stderr)
        usage = parse_resource_usage(_run([unit.cuobjdump, "-res-usage", obj]).stdout)
        elves = os.path.join(unit.folder, f"{unit.dtype}.elf")
        os.makedirs(elves)
        _run([unit.cuobjdump, "-xelf", "all", obj], cwd=elves)
        cubins = sorted(glob.glob(os.path.join(elves, f"*{ARCH}*.cubin")))
        if not cubins:
            raise RuntimeError(f"cuobjdump -xelf all {obj}: no {ARCH} cubin")
        functions = []
        for cubin in cubins:
            try:
                listing = _run([unit.nvdisasm, "-c", "-gi", cubin]).stdout
            except RuntimeError:  # its data-flow analysis can fail: then without BRX targets
                listing = _run([unit.nvdisasm, "-c", "-gi", "-ndf", cubin]).stdout
            functions += parse_disassembly(listing)
        kernels = [f for f in functions if f.name in usage]  # -res-usage lists the entries
        names = demangle([f.name for f in kernels], unit.nvcc)
    except RuntimeError as error:
        out["error"] = str(error)
        return out
    out["rows"] = [
        dict(kernel_row(f, kernel_info(names[f.name], unit.dtype), names[f.name], usage[f.name],
                        spills.get(f.name, (0, 0))[0], unit.regions, out["warnings"]),
             compiler=unit.compiler)
        for f in kernels
    ]  # fmt: skip
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def kernel_row(
    function: Function,
    info: KernelInfo,
    demangled: str,
    usage: dict[str, int],
    spill_stores: int,
    regions: Regions,
    warnings: list[str],
) -> dict:
    """A kernel's row of the report. Keys starting with "_" stay out of the JSON."""
    loops, how = hot_loops(function, info, regions, warnings)
    loops.sort(key=lambda h: (h.pass_, h.loop.header))
    found = [i for h in loops for i in h.loop.instructions]
    return dict(
        backend=info.backend,
        kernel=function.name,
        dtype=info.dtype,
        K=info.K,
        mode=info.mode,
        path=info.path,
        loops=[
            {"pass": h.pass_, "way": h.way, "instructions": h.instructions, "elements": h.elements}
            for h in loops
        ],
        **summarize(loops, info.backend == "triton"),
        loop_barriers=sum(h.loop.count("BAR") for h in loops),
        registers=usage["registers"],
        spill_bytes=spill_stores + usage["local"],
        shared_bytes=usage["shared"],
        vec=info.vec,
        loads=sorted({i.opcode for i in found if i.base in ("LDG", "LDS")}),
        stores=sorted({i.opcode for i in found if i.base in ("STG", "STS")}),
        demangled=demangled,
        _local_in_loops=[
            f"pass {h.pass_}, {h.way} way, loop {h.loop.header:#x}: {' '.join(ops)}"
            for h in loops
            if (ops := sorted({i.opcode for i in h.loop.instructions if i.base in ("LDL", "STL")}))
        ],
        _classified_by=how,
    )


# ---------------------------------------------------------------------------------------------
# The Triton kernels (kernels/mutual_loss.py): specializations the op launches, compiled by Triton
# for sm_90 (with its bundled ptxas and nvdisasm).

# (rows, classes) of the reported row kernels: rows of many tiles, not split; rows not aligned to
# vectors (C = 50257, the scalar path); few long rows (split over programs).
TRITON_SHAPE = (4096, 32000)
TRITON_SCALAR_SHAPE = (4096, 50257)
TRITON_SPLIT_SHAPE = (4, 131072)
TRITON_ROLES = {1: "split_stats", 2: "split_emit", 3: "split_finish", 4: "split_grad"}
# Options of a path: (temperature, label smoothing, the gradient).
TRITON_PATHS = {
    "default": (1.0, 0.0, True),
    "T!=1": (2.0, 0.0, True),
    "smoothing": (1.0, 0.1, True),
    "no_grad": (1.0, 0.0, False),
}
# The loss family's paths (docs/loss.md), with the default options otherwise: each divergence,
# whose pass 2 column adds its pass 3 (the gradient, a second loop), and a mimicry-only loss of
# unlabeled rows with a normalizer (a 0-dim tensor in place of None).
TRITON_FAMILY = {
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd", beta=0.5),
    "mimicry_only,normalizer": dict(ce_weight=0.0, mimic_unlabeled=True, normalizer=None),
}


@dataclass(frozen=True)
class TritonJob:
    """One specialization to compile and read: what triton_compile.specialize derives, and the
    kernel's info."""

    spec: object  # benchmarks.triton_compile.Specialization
    info: KernelInfo
    regions: Regions


def python_regions(path: str) -> Regions:
    """The (first line, last line, name) of each function of PASS_REGIONS defined in a Python
    source (the Triton kernels'), under its basename."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    found = [
        (node.lineno, node.end_lineno, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name in PASS_REGIONS
    ]
    return {os.path.basename(path): sorted(found)}


def triton_jobs() -> list[TritonJob]:
    """The reported specializations: the row kernel's default path in every dtype at K = 2, 3, 4,
    8 and 16 (float64 to 8: from 9 peers its values, two registers each, spill in the loops);
    every mode with a temperature and without, and pairwise's other paths and the loss family's
    (TRITON_FAMILY), at K = 2 and 4 in float32 and bfloat16, the dtypes of the GPU targets; the
    scalar fallback, the split's three kernels and the backward's."""
    import torch

    from benchmarks import triton_compile as tc
    from fastdml.kernels import mutual_loss as km

    regions = python_regions(km.__file__)
    jobs: dict[object, TritonJob] = {}
    meta = dict(device="meta")

    def add(dtype: str, k: int, mode: str, path: str, shape: tuple[int, int]) -> None:
        temperature, smoothing, grad = TRITON_PATHS.get(path, TRITON_PATHS["default"])
        rows, classes = shape
        logits = torch.empty(k, rows, classes, dtype=getattr(torch, dtype), **meta)
        target = torch.empty(rows, dtype=torch.int64, **meta)
        acc = torch.float64 if dtype == "float64" else torch.float32
        weights = torch.empty(k, k, dtype=acc, **meta) if mode == "weights" else None
        family = dict(TRITON_FAMILY.get(path, {}))
        if "normalizer" in family:
            family["normalizer"] = torch.empty((), dtype=acc, **meta)
        _, launches = km.kernel_launches(
            logits, target, weights, None, mode, temperature, 0.5, smoothing, -100, "mean", grad,
            **family,
        )  # fmt: skip
        for launch, arguments in launches:
            spec = tc.specialize(km._mutual_loss_kernel, arguments, launch)
            vec, stage = launch.constexprs["VEC"], launch.constexprs["STAGE"]
            full = path + (",scalar" if vec == 1 else "")
            if stage == 0:
                info = KernelInfo(TRITON_ROW_KERNEL, dtype, k, vec, mode, full, "triton")
            else:
                role = TRITON_ROLES[stage]
                info = KernelInfo(role, dtype, None, vec, "any", role, "triton")
            jobs.setdefault(spec, TritonJob(spec, info, regions))

    targets = ("float32", "bfloat16")
    for dtype in DTYPES:
        for k in (2, 3, 4, 8) if dtype == "float64" else (2, 3, 4, 8, 16):
            add(dtype, k, "pairwise", "default", TRITON_SHAPE)
    for dtype, k in itertools.product(targets, (2, 4)):
        for mode in MODES:
            for path in TRITON_PATHS if mode == "pairwise" else ("default", "T!=1"):
                add(dtype, k, mode, path, TRITON_SHAPE)
        add(dtype, k, "pairwise", "default", TRITON_SCALAR_SHAPE)
        for path in TRITON_FAMILY:
            add(dtype, k, "pairwise", path, TRITON_SHAPE)
    add("float32", 2, "pairwise", "default", TRITON_SPLIT_SHAPE)
    for dtype in targets:
        grad = torch.empty(2, *TRITON_SHAPE, dtype=getattr(torch, dtype), **meta)
        for grad_loss in (torch.empty((), **meta), torch.empty(2, TRITON_SHAPE[0], **meta)):
            launch, arguments = km.scale_launch(grad, grad_loss)
            spec = tc.specialize(km._scale_grad_kernel, arguments, launch)
            path = "scale_grad" + (",per_row" if grad_loss.dim() else "")
            info = KernelInfo(
                "scale_grad", dtype, None, launch.constexprs["VEC"], "any", path, "triton"
            )
            jobs.setdefault(spec, TritonJob(spec, info, regions))
    return list(jobs.values())


def analyze_triton(job: TritonJob) -> dict:
    """Compiles one Triton specialization for sm_90 and reads it (in a worker process): its row,
    warnings, and the seconds its compile took; or the error."""
    import triton

    from benchmarks import triton_compile as tc

    start = time.perf_counter()
    out: dict = dict(dtype=job.info.dtype, warnings=[])
    try:
        kernel = tc.compile_for(job.spec, "sm_90")
        out["compile_seconds"] = round(time.perf_counter() - start, 1)
        cubin = kernel.asm["cubin"]
        usage = tc.resource_usage(cubin)
        spill_stores = 0
        if usage["stack_bytes"]:
            spill_stores = tc.spills(kernel.asm["ptx"], 90)["spill_store_bytes"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
            file.write(cubin)
            file.flush()
            listing = _run([os.path.join(tc.TOOLS, "nvdisasm"), "-c", "-gi", file.name]).stdout
    except Exception as error:  # any compiler or tool error is a failure to report
        out["error"] = f"{job.spec.describe()}: {type(error).__name__}: {error}"
        return out
    (function,) = [f for f in parse_disassembly(listing) if f.name == job.spec.kernel]
    usage = dict(registers=usage["registers"], shared=kernel.metadata.shared,
                 local=usage["local_bytes"])  # fmt: skip
    row = kernel_row(
        function, job.info, job.spec.describe(), usage, spill_stores, job.regions, out["warnings"]
    )
    out["rows"] = [dict(row, compiler=f"Triton {triton.__version__}")]
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Checks and output.


def _order(row: dict) -> tuple:
    """By backend (CUDA, Triton), then row kernels first: the vectorized ones, budgeted paths
    first, the run-time one last; then the scalar fallbacks; by mode, path (the default first),
    dtype and K, the cluster kernel after the other. Then the other kernels."""
    path = row["path"]
    parts = path.split(",")
    options = [part for part in parts if part != "cluster"]
    budgeted = is_row(row) and row_budget(row) is not None
    rank = 0 if budgeted else 2 if "runtime" in path else 1
    return (
        BACKENDS.index(row["backend"]),
        not is_row(row),
        "scalar" in path,
        rank,
        MODES.index(row["mode"]) if row["mode"] in MODES else len(MODES),
        options != ["default"],
        options,
        DTYPES.index(row["dtype"]),
        row["K"] or 0,
        "cluster" in parts,
        row["kernel"],
    )


def is_row(row: dict) -> bool:
    return row["K"] is not None


def short_name(demangled: str) -> str:
    """A demangled kernel name without its namespaces, return type and parameters."""
    text = demangled.replace("(anonymous namespace)::", "")
    text = re.sub(r"\b(?:\w+::)+", "", text)
    text = re.sub(r"^void\s+", "", text)
    depth = 0
    for n, char in enumerate(text):
        depth += char == "<"
        depth -= char == ">"
        if char == "(" and depth == 0:
            return text[:n]
    return text


def check(rows: list[dict]) -> list[str]:
    """What fails: local memory in a hot loop, missing passes, budgets exceeded. Spills outside
    the hot loops are reported (spill_bytes), not failed."""
    failures = []
    for row in rows:
        name = f"{short_name(row['demangled'])} [{row['mode']}, {row['path']}]"
        if row["_local_in_loops"] and row["path"].split(",")[0] not in WITHOUT_LOGITS:
            failures.append(
                f"{name}: local memory in a hot loop ({'; '.join(row['_local_in_loops'])})"
            )
        if not is_row(row):
            continue
        passes = {loop["pass"] for loop in row["loops"]}
        if passes != {1, 2}:
            missing = sorted({1, 2} - passes)
            failures.append(f"{name}: no pass {' or '.join(map(str, missing))} loop found")
            continue
        budget = row_budget(row)
        value = row["instructions_per_element"]
        if budget is not None and value is not None and value > budget:
            failures.append(
                f"{name}: {value:.1f} instructions per element, over the budget {budget:g}"
            )
        if budget is not None and row["loop_barriers"]:
            failures.append(f"{name}: {row['loop_barriers']} barriers in its hot loops")
    return failures


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _widths(opcodes: Sequence[str]) -> str:
    """LDG.E.EF.128 -> LDG.128; the distinct kinds and widths of a row's hot-loop accesses."""
    kinds = sorted({f"{op.split('.')[0]}.{width(op) * 8}" for op in opcodes})
    return " ".join(kinds)


def render(rows: list[dict], flags: list[str], limit: int) -> str:
    """The markdown of the section: an intro and, per backend, one line per row kernel (scalar
    fallbacks and other kernels are in the JSON)."""
    compilers = {row["backend"]: row["compiler"] for row in rows}
    lines = [
        "`python -m benchmarks.sass_report` compiles the GPU kernels for sm_90 only, without a "
        "GPU, and counts the static SASS instructions of each row kernel's innermost hot loops: "
        f"the CUDA kernels with {compilers.get('cuda', 'nvcc')} and setup.py's flags "
        f"(`{' '.join([*flags, '-lineinfo', *GENCODE])}`), and the Triton kernel's "
        f"specializations with {compilers.get('triton', 'Triton')} at the shapes the op launches "
        f"them for: ({TRITON_SHAPE[0]} rows, {TRITON_SHAPE[1]} classes), rows of many tiles, "
        "each read by pass 1 and again by pass 2 (a row of one tile is read once and has no "
        "loop). "
        "*pass 1* (the log-sum-exps) and *pass 2* (gradient and loss sums): instructions per "
        "logit element of the pass's loops along the costliest way; *cluster*: both passes "
        "along the cluster way (the `,cluster` kernels: sm_90 thread-block clusters, the row's "
        "chunk resident in shared memory; pass 1 takes the maxima, then the sums at them); "
        "*instructions / element*: both passes along one element's way (the largest of the "
        "shared-memory cache's, the streamed one and the cluster's; Triton's kernel streams "
        "only); *budget*: the most CI allows; *MUFU*: special-function instructions (exp2, "
        "reciprocal) per element, along the costliest way; *barriers*: barrier instructions in "
        "the hot loops (CI allows none in a budgeted Triton kernel); *regs*: registers a thread; "
        "*spill*: bytes spilled to local memory; *shared*: static shared memory (the CUDA row "
        "cache is dynamic); *memory*: the access widths (bits) in the hot loops. Vectorized "
        "kernels only; the scalar fallbacks and the other kernels are in "
        "`benchmarks/results/sass_sm90.json`.",
    ]
    for backend, title in (("cuda", "CUDA"), ("triton", "Triton")):
        shown = [r for r in rows if r["backend"] == backend and is_row(r)]
        shown = sorted((r for r in shown if "scalar" not in r["path"]), key=_order)
        if not shown:
            continue
        lines += [
            "",
            f"**{title}**",
            "",
            "| dtype | K | VEC | mode | path | pass 1 | pass 2 | cluster | instructions / element "
            "| budget | MUFU / element | barriers | regs | spill | shared | memory |",
            "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in shown[:limit]:
            budget = row_budget(row)
            cells = [
                row["dtype"],
                str(row["K"]),
                str(row["vec"]),
                row["mode"],
                f"`{row['path']}`",
                _fmt(row["pass1_per_element"]),
                _fmt(row["pass2_per_element"]),
                _fmt(row["cluster_per_element"]),
                _fmt(row["instructions_per_element"]),
                "—" if budget is None else f"{budget:g}",
                _fmt(row["mufu_per_element"], 2),
                str(row["loop_barriers"]),
                str(row["registers"]),
                str(row["spill_bytes"]),
                str(row["shared_bytes"]),
                _widths([*row["loads"], *row["stores"]]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if len(shown) > limit:
            more = len(shown) - limit
            lines += ["", f"{more} more row kernels in `benchmarks/results/sass_sm90.json`."]
    return "\n".join(lines)


def write_markdown(path: Path, body: str) -> None:
    """Replaces what is between the markers, or adds the section (with them) before `## GPU`."""
    text = path.read_text(encoding="utf-8")
    begin, end = MARKERS
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        section = f"{SECTION}\n\n{block}\n\n"
        at = text.find("\n## GPU\n")
        text = text + "\n" + section if at < 0 else text[: at + 1] + section + text[at + 1 :]
    path.write_text(text, encoding="utf-8")


def cuda_results(csrc: str, dtypes: list[str], jobs: int) -> list[dict]:
    """Compiles the CUDA translation units of `dtypes` and reads them, in worker processes."""
    nvcc = find_nvcc()
    cuobjdump, nvdisasm = find_tool("cuobjdump", nvcc), find_tool("nvdisasm", nvcc)
    found = re.search(r"release [^\n]*", _run([nvcc, "--version"]).stdout)
    version = f"nvcc {found[0].strip()}" if found else "nvcc"
    flags = nvcc_flags()
    with tempfile.TemporaryDirectory(prefix="sass_report_") as folder:
        copy = os.path.join(folder, "csrc")
        shutil.copytree(csrc, copy)
        sources = {}
        for path in glob.glob(os.path.join(copy, "*.cu*")) + glob.glob(os.path.join(copy, "*.h")):
            with open(path, encoding="utf-8") as file:
                sources[path] = file.read()
        regions = source_regions(sources)
        units = [
            Unit(dtype, os.path.join(copy, f"mutual_loss_cuda_{dtype}.cu"), folder, nvcc, flags,
                 cuobjdump, nvdisasm, regions, version)
            for dtype in dtypes
        ]  # fmt: skip
        with ProcessPoolExecutor(max(1, jobs)) as pool:
            return [dict(result, backend="cuda") for result in pool.map(analyze_unit, units)]


def triton_results(jobs: int) -> list[dict]:
    """Compiles the reported Triton specializations and reads them, in worker processes."""
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        return [
            dict(result, backend="triton") for result in pool.map(analyze_triton, triton_jobs())
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument(
        "--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
        help="the kernels to compile; the others' rows are kept from --out",
    )  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sass_sm90.json"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="'' for none")
    parser.add_argument("--table-rows", type=int, default=60, help="row kernels in a table")
    parser.add_argument("--csrc", default=str(ROOT / "csrc"), help="the sources to compile")
    parser.add_argument(
        "--no-check", action="store_true", help="report; fail on no spill nor budget"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = []
    if "cuda" in args.backends:
        results += cuda_results(args.csrc, args.dtypes, args.jobs)
    if "triton" in args.backends:
        results += triton_results(args.jobs)
    for result in results:
        if "error" in result:
            print(f"FAILED to compile or disassemble ({result['backend']} {result['dtype']}):")
            print(result["error"])
    if any("error" in result for result in results):
        return 1
    rows = [row for result in results for row in result["rows"]]
    if set(args.backends) != set(BACKENDS) and os.path.exists(args.out):
        with open(args.out) as file:
            rows += [r for r in json.load(file) if r["backend"] not in args.backends]
    rows.sort(key=_order)
    warnings = [warning for result in results for warning in result["warnings"]]
    failures = check([row for row in rows if row["backend"] in args.backends])
    seconds = time.perf_counter() - start
    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(public, file, indent=1)
        file.write("\n")
    if args.markdown:
        write_markdown(Path(args.markdown), render(rows, nvcc_flags(), args.table_rows))
    print_summary(rows, results, seconds, args.jobs)
    for warning in warnings:
        print(f"warning: {warning}")
    for failure in failures:
        print(f"{'would fail (--no-check)' if args.no_check else 'FAILED'}: {failure}")
    print(f"wrote {args.out}" + (f" and {args.markdown}" if args.markdown else ""))
    return 1 if failures and not args.no_check else 0


def print_summary(rows: list[dict], results: list[dict], seconds: float, jobs: int) -> None:
    compiles = [
        f"{r['dtype']} {r['compile_seconds']:.0f} + {r['seconds'] - r['compile_seconds']:.0f} s"
        for r in results
        if r["backend"] == "cuda"
    ]
    triton = [r["seconds"] for r in results if r["backend"] == "triton"]
    if triton:
        compiles.append(f"Triton {len(triton)} specializations {sum(triton):.0f} s")
    compilers = sorted({row["compiler"] for row in rows})
    print(
        f"{', '.join(compilers)}, {ARCH}: {len(rows)} kernels in {seconds:.0f} s with {jobs} jobs "
        f"(compile + analysis: {'; '.join(compiles)})"
    )
    header = f"{'backend':<7} {'dtype':<9} {'K':>2} {'VEC':>3} {'mode':<9} {'path':<22} "
    header += f"{'pass1':>6} {'pass2':>6} {'cluster':>7} {'instr/el':>8} {'MUFU/el':>7} "
    header += f"{'bar':>3} {'regs':>4} {'spill':>5}  memory"
    print(header)
    for row in rows:
        if not is_row(row) or "scalar" in row["path"]:
            continue
        print(
            f"{row['backend']:<7} {row['dtype']:<9} {row['K']:>2} {row['vec']:>3} "
            f"{row['mode']:<9} {row['path']:<22} "
            f"{_fmt(row['pass1_per_element']):>6} {_fmt(row['pass2_per_element']):>6} "
            f"{_fmt(row['cluster_per_element']):>7} {_fmt(row['instructions_per_element']):>8} "
            f"{_fmt(row['mufu_per_element'], 2):>7} {row['loop_barriers']:>3} "
            f"{row['registers']:>4} {row['spill_bytes']:>5}  "
            f"{_widths([*row['loads'], *row['stores']])}"
        )


if __name__ == "__main__":
    sys.exit(main())
