"""Installing fastdml: setup.py without torch says what to do; CI reads its compile flags."""

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

# setup.py as pip's build backend runs it, in an environment without torch
WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # `import torch` then fails as if torch were not installed
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_without_torch_says_to_install_torch_first():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
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
