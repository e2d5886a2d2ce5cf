"""The loss library: the mutual loss, its fused linear form for large vocabularies, and the
backends that compute them (pure PyTorch, the C++ CPU op, the Triton and CUDA C++ GPU ops)."""

from fastdml.loss.backends import available_backends
from fastdml.loss.linear_loss import FusedLinearMutualLoss, fused_linear_mutual_loss
from fastdml.loss.mutual_loss import MutualLoss, MutualLossOutput, mutual_loss
from fastdml.loss.options import LossOptions

__all__ = [
    "FusedLinearMutualLoss",
    "LossOptions",
    "MutualLoss",
    "MutualLossOutput",
    "available_backends",
    "fused_linear_mutual_loss",
    "mutual_loss",
]
