"""Experiments that reproduce the Deep Mutual Learning paper with fastdml (docs/results.md)."""
