"""Stacked cohorts: K peers of one architecture as one module whose parameters have the peers
first, so a step runs one batched forward, backward and optimizer update for the whole cohort."""

from fastdml.stacked.cohort import StackedCohort
from fastdml.stacked.layers import stack_peers

__all__ = ["StackedCohort", "stack_peers"]
