"""Installing fastdml: setup.py without torch says what to do, the source distribution carries
what a build needs, and the repository's `kernels/` folder never takes the top-level name
`kernels` from the PyPI package of that name."""

import glob
import os
import runpy
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

import fastdml

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -c code` in the repository's root, where `kernels/` is on the path."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[set[str], str]:
    """The file names in a freshly built sdist, and its PKG-INFO."""
    out = tmp_path_factory.mktemp("sdist")
    result = run_from_root(
        f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0] + "/"
        pkg_info = tar.extractfile(top + "PKG-INFO").read().decode()
        return {name.removeprefix(top) for name in tar.getnames()}, pkg_info


@pytest.fixture(scope="module")
def sdist_files(sdist) -> set[str]:
    return sdist[0]


@pytest.fixture(scope="module")
def sdist_pkg_info(sdist) -> str:
    return sdist[1]


def test_the_sdist_holds_every_source_of_the_build(sdist_files):
    """csrc's CUDA sources among them: without them a CUDA machine builds no kernels."""
    sources = [
        *glob.glob("csrc/*.cu", root_dir=ROOT),
        *glob.glob("csrc/*.cuh", root_dir=ROOT),
        *glob.glob("csrc/*.h", root_dir=ROOT),
        *glob.glob("csrc/*.cpp", root_dir=ROOT),
        *glob.glob("kernels/*.py", root_dir=ROOT),
        *glob.glob("fastdml/**/*.py", root_dir=ROOT, recursive=True),
        "setup.py",
        "pyproject.toml",
        "README.md",
    ]
    assert any(path.endswith(".cu") for path in sources)
    assert sorted(set(sources) - sdist_files) == []


def test_the_version_is_written_once(sdist_files, sdist_pkg_info):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert f"\nVersion: {fastdml.__version__}\n" in sdist_pkg_info


def test_kernels_from_the_root_is_the_pypi_package(tmp_path):
    package = tmp_path / "kernels"
    (package / "_internals").mkdir(parents=True)
    (package / "__init__.py").write_text("CUDAProperties = 'the PyPI package'\n")
    (package / "_internals" / "locking.py").write_text("def write_egg_lockfile(): pass\n")
    result = run_from_root(
        """
        from kernels import CUDAProperties
        from kernels._internals.locking import write_egg_lockfile
        import kernels, fastdml.kernels.mutual_loss
        print(CUDAProperties, kernels.__file__)
        """,
        PYTHONPATH=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the PyPI package " + str(package))


# An environment without the PyPI package, whether or not this one has it (transformers brings it):
# the hand-off's search of the rest of the path finds no other `kernels`.
WITHOUT_PYPI_KERNELS = """
import importlib.machinery
find_spec = importlib.machinery.PathFinder.find_spec
def without_pypi_kernels(name, path=None, target=None):
    if name == "kernels" and path is not None:
        return None
    return find_spec(name, path, target)
importlib.machinery.PathFinder.find_spec = without_pypi_kernels
"""


def test_kernels_from_the_root_is_missing_without_the_pypi_package():
    result = run_from_root(
        WITHOUT_PYPI_KERNELS
        + textwrap.dedent(
            """
        import fastdml.kernels.mutual_loss
        try:
            import kernels
        except ModuleNotFoundError as error:
            print(error.name)
        """
        )
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kernels"


def test_kernels_from_the_root_under_a_second_spelling_of_it(tmp_path):
    """The root on the path twice (a symlink): still no package, not an endless hand-off."""
    (tmp_path / "link").symlink_to(ROOT)
    result = run_from_root(
        WITHOUT_PYPI_KERNELS
        + textwrap.dedent(
            """
        try:
            import kernels
        except ModuleNotFoundError as error:
            print(error.name)
        """
        ),
        PYTHONPATH=str(tmp_path / "link"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "kernels"


def test_the_first_compiled_call_loads_triton():
    """In a fresh process, torch.compile's trace is what first asks for the Triton kernels."""
    result = run_from_root(
        """
        import torch, fastdml
        z, y = torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
        loss = lambda z, y: fastdml.mutual_loss(z, y, temperature=2.0, backend="triton")
        compiled = torch.compile(loss, fullgraph=True)(z, y)
        torch.testing.assert_close(compiled, fastdml.mutual_loss(z, y, temperature=2.0))
        """,
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_leaves_triton_alone():
    """Importing Triton costs about a second; without a GPU nothing asks for it."""
    result = run_from_root(
        "import sys, fastdml; print('triton' in sys.modules)", TRITON_INTERPRET="0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_setup_without_torch_says_to_install_torch_first():
    """As pip's build backend runs setup.py, in an environment without torch."""
    result = run_from_root(
        """
        import runpy, sys
        sys.modules["torch"] = None  # `import torch` then fails as if torch were not installed
        sys.argv = ["setup.py", "--version"]
        runpy.run_path("setup.py", run_name="__main__")
        """
    )
    assert result.returncode == 1
    assert result.stderr == (
        "fastdml builds its C++ op against the installed PyTorch: install torch first "
        "(pip install torch), then pip install --no-build-isolation .\n"
    )


def test_setup_under_another_name_gives_the_compile_flags():
    """As .ci/compile_cuda.sh runs it: the flags, and no setup()."""
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="fastdml_setup")
    assert "-std=c++17" in setup["cxx_flags"]()
    assert "--expt-relaxed-constexpr" in setup["nvcc_flags"]()
