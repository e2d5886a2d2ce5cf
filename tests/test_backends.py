"""Backend selection: what runs where, and what happens when a backend is missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

from fastdml import available_backends, backends, mutual_loss, ops, reference


def test_cpu_backends_are_built():
    assert available_backends() == ["torch", "cpp"]


def test_auto_uses_the_fused_op_on_cpu():
    assert backends.select("auto", torch.device("cpu")) is ops.mutual_loss_rows
    assert backends.select("auto", torch.device("meta")) is reference.mutual_loss_rows


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_missing_backend_is_named(name):
    with pytest.raises(RuntimeError, match=f"backend='{name}' is not available"):
        mutual_loss(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long), backend=name)


def test_cpp_needs_cpu_tensors():
    with pytest.raises(ValueError, match="runs on cpu tensors, but the logits are on meta"):
        backends.select("cpp", torch.device("meta"))


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
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['torch']"
