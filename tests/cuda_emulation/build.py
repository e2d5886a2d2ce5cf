"""Builds csrc/*.cu as plain C++ for the CPU emulation of the CUDA kernels (cuda_emulation.h).

Every csrc/*.cu and *.cuh is rewritten where CUDA is not C++ (the launch syntax and __shared__
declarations) or where the emulator needs more than the call gives (cudaLaunchKernelEx: the
launcher's name and the kernel expression, as for <<<>>>), and each .cu is compiled by the host
C++ compiler as its own translation unit, in parallel, then linked with the emulator and the
ctypes driver into one shared library. The library is cached under a key of everything that goes
into it, so a test session builds it once and later sessions on an unchanged tree not at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The kernels to build: this checkout's, or another copy of them (to try a change, or to check that
# the tests catch a deliberate bug).
CSRC = Path(os.environ.get("FASTDML_EMULATION_CSRC") or HERE.parents[1] / "csrc").resolve()
LIBRARY = "libcuda_emulation.so"
HOST_SOURCES = ("emulator.cpp", "driver.cpp")
SELF_TEST = HERE / "selftest.cu"  # kernels that check the emulator, rewritten like csrc's
# -ffp-contract=off: __fadd_rn and friends are plain operators in the shim: no fma contraction.
# -fno-strict-aliasing: the kernels reinterpret element pointers as vector packs, as nvcc allows.
FLAGS = ("-std=c++20", "-O1", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-pthread")

# Comments (dropped, keeping their newlines) and the literals that may look like them.
_COMMENT_OR_LITERAL = re.compile(
    r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.DOTALL
)
# name<<<config>>>(args); name may carry template arguments one level deep.
_LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_][\w:]*(?:\s*<(?:[^<>;()]|<[^<>;()]*>)*>)?)\s*"
    r"<<<(?P<config>.*?)>>>\s*\((?P<args>.*?)\)\s*;",
    re.DOTALL,
)
# cudaLaunchKernelEx(config, kernel, ...: the kernel may carry template arguments as above.
_LAUNCH_EX = re.compile(
    r"\bcudaLaunchKernelEx\s*\(\s*(?P<config>[^,;()]+?)\s*,\s*"
    r"(?P<kernel>[A-Za-z_][\w:]*(?:\s*<(?:[^<>;()]|<[^<>;()]*>)*>)?)\s*(?P<end>[,)])"
)
_ALIGN = r"(?:__align__\s*\(\s*\d+\s*\)\s+)?"
_EXTERN_SHARED = re.compile(
    rf"extern\s+__shared__\s+{_ALIGN}(?P<type>[\w:<>,\s*]+?)\s*(?P<name>\b\w+)\s*\[\s*\]\s*;"
)
_SHARED = re.compile(
    rf"__shared__\s+{_ALIGN}(?P<type>[\w:<>,\s*]+?)\s*(?P<name>\b\w+)\s*"
    r"(?P<dims>(?:\[[^\];]*\]\s*)*);"
)


def _same_lines(original: str, replacement: str) -> str:
    """The replacement followed by the newlines it took away, so that line numbers stay."""
    return replacement + "\n" * (original.count("\n") - replacement.count("\n"))


def _drop_comment(match: re.Match[str]) -> str:
    text = match[0]
    return text if text[0] in "\"'" else " " + "\n" * text.count("\n")


def _launch(match: re.Match[str]) -> str:
    kernel = match["kernel"]
    args = match["args"].strip()
    call = (
        f'::cuda_emu::launch(__PRETTY_FUNCTION__, "{" ".join(kernel.split())}", '
        f"::cuda_emu::LaunchConfig({match['config']}), {kernel}{', ' + args if args else ''});"
    )
    return _same_lines(match[0], call)


def _launch_ex(match: re.Match[str]) -> str:
    kernel = match["kernel"]
    call = (
        f'::cuda_emu::launch(__PRETTY_FUNCTION__, "{" ".join(kernel.split())}", '
        f"{match['config']}, {kernel}{match['end']}"
    )
    return _same_lines(match[0], call)


def _extern_shared(match: re.Match[str]) -> str:
    declaration = (
        f"{match['type']}* const {match['name']} = ::cuda_emu::dynamic_shared<{match['type']}>();"
    )
    return _same_lines(match[0], declaration)


def _shared(match: re.Match[str]) -> str:
    dims = "".join(f"[({d})]" for d in re.findall(r"\[([^\]]*)\]", match["dims"]))
    declaration = (
        f"auto& {match['name']} = "
        f"::cuda_emu::block_shared<{match['type']}{dims}>(__FILE__, __LINE__);"
    )
    return _same_lines(match[0], declaration)


def rewrite(source: str, path: Path) -> str:
    """The CUDA source as C++ for the emulator; line numbers and file name kept for messages."""
    text = _COMMENT_OR_LITERAL.sub(_drop_comment, source)
    text = _LAUNCH.sub(_launch, text)
    text = _LAUNCH_EX.sub(_launch_ex, text)
    text = _EXTERN_SHARED.sub(_extern_shared, text)
    text = _SHARED.sub(_shared, text)
    if "<<<" in text or ">>>" in text:
        line = text[: text.find("<<<") if "<<<" in text else text.find(">>>")].count("\n") + 1
        raise ValueError(f"{path}:{line}: a kernel launch the emulation cannot rewrite")
    return f'#line 1 "{path}"\n{text}'


def compiler() -> str | None:
    """The host C++ compiler: $CXX, else g++ or c++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder holding cuda_fp16.h and cuda_bf16.h, if any."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        include = Path(root) / "include"
        if all((include / name).is_file() for name in ("cuda_fp16.h", "cuda_bf16.h")):
            return include
    return None


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here, or None if it can."""
    if compiler() is None:
        return "no C++ compiler (g++ or c++ on PATH, or $CXX)"
    if cuda_include_dir() is None:
        return (
            "the CUDA toolkit's cuda_fp16.h / cuda_bf16.h were not found "
            "($CUDA_HOME, $CUDA_PATH, nvcc on PATH, /usr/local/cuda)"
        )
    return None


def _inputs(csrc: Path) -> list[Path]:
    shim = [p for p in sorted(HERE.rglob("*")) if p.suffix in (".h", ".cpp", ".cu", ".py")]
    kernels = [p for p in sorted(csrc.iterdir()) if p.suffix in (".cu", ".cuh", ".h")]
    return shim + kernels


def _key(csrc: Path, cxx: str, include: Path) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    for part in (version.stdout, str(include), " ".join(FLAGS)):
        digest.update(part.encode() + b"\0")
    for path in _inputs(csrc):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _compile(cxx: str, source: Path, obj: Path, include_dirs: list[Path]) -> None:
    command = [cxx, *FLAGS, "-include", str(HERE / "cuda_emulation.h")]
    command += [f"-I{d}" for d in include_dirs]
    command += ["-x", "c++", "-c", str(source), "-o", str(obj)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr[-20000:]}")


def build(cache_dir: Path, csrc: Path = CSRC) -> Path:
    """The emulation library of the kernels in `csrc`, built into `cache_dir` if not there."""
    cxx, include = compiler(), cuda_include_dir()
    if cxx is None or include is None:
        raise RuntimeError(unavailable_reason())
    target = cache_dir / _key(csrc, cxx, include)
    library = target / LIBRARY
    if library.is_file():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir))
    try:
        kernels = [p for p in sorted(csrc.iterdir()) if p.suffix in (".cu", ".cuh")]
        if not any(p.suffix == ".cu" for p in kernels):
            raise RuntimeError(f"no .cu files in {csrc}")
        for path in [*kernels, SELF_TEST]:
            (work / path.name).write_text(rewrite(path.read_text(), path))
        sources = sorted(work.glob("*.cu")) + [HERE / name for name in HOST_SOURCES]
        include_dirs = [HERE / "include", work, csrc, HERE, include]
        objects = [work / f"{source.name}.o" for source in sources]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda s, o: _compile(cxx, s, o, include_dirs), sources, objects))
        command = [cxx, "-shared", "-pthread", "-o", str(work / LIBRARY), *map(str, objects)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"linking the emulation failed:\n{result.stderr[-20000:]}")
        try:
            work.rename(target)  # atomic; another session may have won the race
        except OSError:
            if not library.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return library
