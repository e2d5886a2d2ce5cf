"""Errors that a user can fix: the command line reports them in one line, without a traceback."""


class UserError(Exception):
    """Something the user asked for cannot be done as asked (a bad option, file or folder)."""


class ConfigError(UserError, ValueError):
    """A run configuration (flags or a config file) names something unknown or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or was written for a different cohort."""


class DistributedError(UserError):
    """A rank of a distributed cohort stopped, or the ranks cannot reach each other."""
