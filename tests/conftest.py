import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. It must be on
    # before the kernels are first used (fastdml imports them then).
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Every backend on the device it runs on. The CUDA ones run with CUDA as the default device, so
# the tests' tensors are created there; without a GPU they are skipped.
BACKENDS = [
    pytest.param(("cpu", "torch"), id="torch"),
    pytest.param(("cpu", "cpp"), id="cpp"),
    pytest.param(("cpu", "triton"), id="triton"),
    pytest.param(("cuda", "torch"), id="cuda-torch", marks=pytest.mark.cuda),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.cuda),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.cuda),
]

FUSED_BACKENDS = [param for param in BACKENDS if param.values[0][1] != "torch"]


def pytest_configure(config):
    # numpy's warnings about masked-off lanes (log of 0) while interpreting Triton kernels
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


# The fixtures below hold no state that one generated example could leave to the next.
settings.register_profile(
    "fastdml", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("fastdml")


def on_device(device: str, name: str, request: pytest.FixtureRequest) -> str:
    """Makes `device` the default for the test's tensors; skips what cannot run here."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        torch.set_default_device("cuda")
        request.addfinalizer(lambda: torch.set_default_device(None))
    elif name == "triton" and not INTERPRETED:
        pytest.skip("Triton's interpreter is off (a GPU is present): the cuda-triton tests run")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend; a missing one fails its tests (on its device), it is not skipped."""
    return on_device(*request.param, request)


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    """The fused kernels only: the C++ CPU op, Triton and CUDA C++."""
    return on_device(*request.param, request)


def skip_if_unsupported(backend: str, dtype: torch.dtype) -> None:
    """Triton's interpreter computes with numpy, which has no bfloat16."""
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
