"""The loss options as one record: checked once, shared by the functions, the modules and the
cohort, and readable and writable as the modules' attributes."""

import pytest
import torch

from fastdml import FusedLinearMutualLoss, MutualLoss, MutualLossOutput, mutual_loss
from fastdml.loss import LossOptions


def test_the_record_is_checked_again_when_changed():
    options = LossOptions(temperature=2.0)
    assert options.replace(alpha=0.5).alpha == 0.5
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        options.replace(alpha=-1.0)
    with pytest.raises(TypeError, match="temprature"):
        LossOptions(temprature=2.0)


def test_module_attributes_are_the_options():
    criterion = MutualLoss(temperature=2.0, mode="ensemble")
    assert (criterion.temperature, criterion.mode) == (2.0, "ensemble")
    criterion.alpha = 0.25
    assert criterion.options.alpha == 0.25
    with pytest.raises(ValueError, match="temperature"):
        criterion.temperature = 0.0
    assert criterion.temperature == 2.0  # a rejected value leaves the record as it was


def test_a_module_computes_what_the_function_does():
    z, y = torch.randn(3, 5, 7), torch.randint(0, 7, (5,))
    options = dict(temperature=3.0, alpha=0.5, label_smoothing=0.1, mode="ensemble_logits")
    criterion = MutualLoss(**options)
    criterion.temperature = 1.5
    expected = mutual_loss(z, y, **(options | dict(temperature=1.5)))
    torch.testing.assert_close(criterion(z, y), expected, rtol=0, atol=0)


def test_return_components_per_call():
    z, y = torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
    criterion = MutualLoss()
    out = criterion(z, y, return_components=True)
    assert isinstance(out, MutualLossOutput)
    torch.testing.assert_close(out.loss, criterion(z, y), rtol=0, atol=0)
    assert isinstance(
        MutualLoss(return_components=True)(z, y, return_components=False), torch.Tensor
    )
    hidden, weight = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    linear = FusedLinearMutualLoss()
    out = linear(hidden, weight, y, return_components=True)
    assert isinstance(out, MutualLossOutput) and out.ce.shape == (2,)


def test_peer_weights_follow_the_module():
    """Kept as float64, they move with the module as a buffer would (each call casts them to
    the logits' accumulation dtype)."""
    weights = [[0.0, 1.0], [0.0, 0.0]]
    criterion = MutualLoss(peer_weights=weights)
    assert criterion.peer_weights.dtype == torch.float64
    criterion.to(torch.float32)
    assert criterion.peer_weights.dtype == torch.float32
    assert criterion.options.peer_weights is criterion.peer_weights
    z, y = torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
    torch.testing.assert_close(criterion(z, y), mutual_loss(z, y, peer_weights=weights))


@pytest.mark.cuda
def test_peer_weights_move_with_the_module():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    criterion = MutualLoss(peer_weights=[[0.0, 1.0], [0.0, 0.0]]).cuda()
    assert criterion.peer_weights.device.type == "cuda"


def test_a_move_to_meta_keeps_the_peer_weights_unchecked():
    """A device move is not a new value: meta tensors hold none to check."""
    criterion = MutualLoss(peer_weights=[[0.0, 1.0], [1.0, 0.0]]).to("meta")
    assert criterion.peer_weights.device.type == "meta"


def test_return_components_is_read_as_a_truth_value():
    z, y = torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
    assert isinstance(mutual_loss(z, y, return_components=1), MutualLossOutput)
    assert isinstance(mutual_loss(z, y, return_components=None), torch.Tensor)
