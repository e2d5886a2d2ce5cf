"""fastdml: Deep Mutual Learning for PyTorch.

A cohort of K peer networks trains together; each peer minimises its own cross-entropy plus the
KL divergence from the other peers' class posteriors to its own (Zhang et al., CVPR 2018).
"""

from fastdml.backends import available_backends
from fastdml.loss import MutualLoss, MutualLossOutput, mutual_loss

__all__ = ["MutualLoss", "MutualLossOutput", "available_backends", "mutual_loss"]
__version__ = "0.1.0"
