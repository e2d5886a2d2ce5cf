import pytest
import torch
from hypothesis import HealthCheck, settings

BACKENDS = ["torch", "cpp"]

# The fixtures below hold no state that one generated example could leave to the next.
settings.register_profile(
    "fastdml", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("fastdml")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that runs on CPU tensors; a missing one fails its tests, it is not skipped."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
