"""Benchmark harness: `sweep` runs model x method x budget (sweep.py); standard-benchmark loaders and
their official scorers live in `datasets`."""

from .sweep import sweep

__all__ = ["sweep"]
