"""Backend selection: what runs where, and what happens when a backend is missing."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from fastdml import available_backends, mutual_loss
from fastdml.loss import backends


def test_backends_of_this_build():
    """CI's build: the C++ CPU op and Triton (interpreted); the CUDA kernels need a CUDA torch
    and a GPU."""
    expected = ["torch", "cpp", "triton"] + (["cuda"] if torch.cuda.is_available() else [])
    assert available_backends() == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_the_gpu_backends_are_not_listed():
    """Triton runs on CPU tensors only in its interpreter: without it, not here."""
    script = "import fastdml; print(fastdml.available_backends())"
    assert _available_backends_after(script, TRITON_INTERPRET="0") == "['torch', 'cpp']"


def test_auto_uses_the_fused_op_on_cpu():
    assert backends.select("auto", torch.device("cpu"), 2, 10) == "cpp"
    assert backends.select("auto", torch.device("meta"), 2, 10) == "torch"


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_missing_cuda_kernels_are_named():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*without its CUDA"):
        mutual_loss(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long), backend="cuda")


@pytest.mark.parametrize(
    "name, message",
    [
        ("cpp", "runs on cpu tensors, but the logits are on meta"),
        ("cuda", "runs on cuda tensors, but the logits are on meta"),
        ("triton", "runs on cuda tensors .cpu tensors only under TRITON_INTERPRET=1."),
    ],
)
def test_backends_need_their_device(monkeypatch, name, message):
    monkeypatch.setitem(backends._NOT_BUILT, name, None)
    with pytest.raises(ValueError, match=message):
        backends.select(name, torch.device("meta"), 2, 10)


def test_without_triton_its_backend_is_named():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch, fastdml
        try:
            fastdml.mutual_loss(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long),
                                backend="triton")
        except RuntimeError as error:
            assert "triton" in str(error), error
        else:
            raise AssertionError("backend='triton' ran without triton")
        print(fastdml.available_backends())
        """
    )
    assert _available_backends_after(script) == "['torch', 'cpp']"


def test_without_the_extension_auto_falls_back_with_one_warning():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["fastdml._C"] = None  # as if the extension had not been built
        import torch, fastdml
        z, y = torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                fastdml.mutual_loss(z, y)
        assert len(caught) == 1, caught
        assert "fastdml._C" in str(caught[0].message), caught[0].message
        try:
            fastdml.mutual_loss(z, y, backend="cpp")
        except RuntimeError as error:
            assert "fastdml._C" in str(error), error
        else:
            raise AssertionError("backend='cpp' ran without the extension")
        print(fastdml.available_backends())
        """
    )
    assert _available_backends_after(script) == "['torch', 'triton']"


def _available_backends_after(script: str, **env: str) -> str:
    """Runs `script` in a fresh interpreter (it must succeed) and returns what it printed."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_triton_takes_up_to_its_peer_limit():
    limit = backends.max_peers("triton")
    assert backends.select("triton", torch.device("cpu"), limit, 10) == "triton"
    with pytest.raises(ValueError, match=f"backend='triton' .* up to {limit} peers, got K = "):
        backends.select("triton", torch.device("cpu"), limit + 1, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA kernels here: auto falls back to torch
        assert backends.select("auto", torch.device("cuda"), limit + 1, 10**6) != "triton"


@pytest.mark.filterwarnings("ignore:fastdml falls back")
def test_auto_on_cuda_takes_the_measured_faster_op(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    cuda = torch.device("cuda")
    assert backends.select("auto", cuda, 2, backends.TRITON_FROM_CLASSES - 1) == "cuda"
    assert backends.select("auto", cuda, 2, backends.TRITON_FROM_CLASSES) == "triton"
    assert backends.select("auto", cuda, 17, backends.TRITON_FROM_CLASSES) == "cuda"
    assert backends.select("auto", cuda, 1025, 10) == "torch"


def test_torch_func_transforms_run_the_pure_pytorch_backend():
    """Under torch.func.grad_and_value (as Liger-Kernel's chunked losses take their gradients)
    backend="auto" computes with the pure-PyTorch backend; a fused backend by name is refused."""
    logits = torch.randn(3, 6, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (6,))
    grad, value = torch.func.grad_and_value(lambda z: mutual_loss(z, target, temperature=2.0))(
        logits
    )
    expected = logits.clone().requires_grad_()
    loss = mutual_loss(expected, target, temperature=2.0)
    loss.backward()
    torch.testing.assert_close(value, loss.detach())
    torch.testing.assert_close(grad, expected.grad)
    with pytest.raises(ValueError, match="backend='cpp' cannot run under torch.func transforms"):
        torch.func.grad(lambda z: mutual_loss(z, target, backend="cpp"))(logits)


def test_auto_takes_triton_first_for_the_family_on_cuda(monkeypatch):
    """Every backend computes the loss family, the CUDA op with its generic kernel: on CUDA
    tensors backend="auto" takes Triton first at any number of classes, and the CUDA op where
    Triton is missing or takes too few peers; on the CPU the C++ op. A backend by name computes
    it where it runs."""
    missing = set()
    monkeypatch.setattr(
        backends, "unavailable_reason", lambda name: "not installed" if name in missing else None
    )
    cuda, limit = torch.device("cuda"), backends.max_peers("triton")
    for classes in (10, backends.TRITON_FROM_CLASSES):
        assert backends.select("auto", cuda, 2, classes, family=True) == "triton"
    assert backends.select("auto", cuda, 2, 10) == "cuda"  # the paper's loss, as measured
    assert backends.select("auto", cuda, limit + 1, 10, family=True) == "cuda"
    assert backends.select("auto", torch.device("cpu"), 2, 10, family=True) == "cpp"
    assert backends.select("auto", torch.device("meta"), 2, 10, family=True) == "torch"
    for name in ("torch", "cuda", "triton"):
        assert backends.select(name, cuda, 2, 10, family=True) == name
    missing.add("triton")
    assert backends.select("auto", cuda, 2, 10, family=True) == "cuda"
