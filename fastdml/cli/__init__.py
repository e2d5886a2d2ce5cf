"""The `fastdml` command: its parser and subcommands, run configurations, runs and comparisons."""

from fastdml.cli.commands import main

__all__ = ["main"]
