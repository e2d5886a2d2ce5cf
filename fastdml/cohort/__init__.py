"""The cohort trainer: one step of K peers (`Cohort`), the epochs around it (`Trainer`), the
per-peer optimizers and schedules, checkpoints, metric records and plots."""

from fastdml.cohort.cohort import Cohort, Evaluation, StepOutput
from fastdml.cohort.optim import LRSchedule, clip_grad_norms_, make_optimizer
from fastdml.cohort.trainer import Trainer

__all__ = [
    "Cohort",
    "Evaluation",
    "LRSchedule",
    "StepOutput",
    "Trainer",
    "clip_grad_norms_",
    "make_optimizer",
]
