"""fastdml: Deep Mutual Learning for PyTorch.

A cohort of K peer networks trains together; each peer minimises its own cross-entropy plus the
KL divergence from the other peers' class posteriors to its own (Zhang et al., CVPR 2018).
"""

from fastdml.cohort import (
    Cohort,
    Evaluation,
    LRSchedule,
    StepOutput,
    Trainer,
    clip_grad_norms_,
    make_optimizer,
)
from fastdml.data import InMemoryLoader, load_dataset
from fastdml.distributed import DistributedCohort
from fastdml.errors import CheckpointError, ConfigError, DistributedError, UserError
from fastdml.loss import (
    FusedLinearMutualLoss,
    LossOptions,
    MutualLoss,
    MutualLossOutput,
    available_backends,
    fused_linear_mutual_loss,
    mutual_loss,
)
from fastdml.models import build_model
from fastdml.stacked import StackedCohort, stack_peers

__all__ = [
    "CheckpointError",
    "Cohort",
    "ConfigError",
    "DistributedCohort",
    "DistributedError",
    "Evaluation",
    "FusedLinearMutualLoss",
    "InMemoryLoader",
    "LRSchedule",
    "LossOptions",
    "MutualLoss",
    "MutualLossOutput",
    "StackedCohort",
    "StepOutput",
    "Trainer",
    "UserError",
    "available_backends",
    "build_model",
    "clip_grad_norms_",
    "fused_linear_mutual_loss",
    "load_dataset",
    "make_optimizer",
    "mutual_loss",
    "stack_peers",
]
__version__ = "0.1.0"
