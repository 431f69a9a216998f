"""Hyperparameter sweeps on Ray Tune: the only package that imports ray.

`search_space` maps params.yaml search spaces to Tune domains, `sample_config` draws what a seeded sweep
runs, `run_sweep` runs (or resumes) one family's sweep and returns a `SweepResult` of `TrialRecord`s.
"""

from typing import Any

from pipeline.tuning.results import SweepResult, TrialRecord

__all__ = ["SweepResult", "TrialRecord", "init_ray", "run_sweep", "sample_config", "search_space", "sweep_key"]
_LAZY = {"init_ray": "sweep", "run_sweep": "sweep", "sweep_key": "sweep", "sample_config": "space",
         "search_space": "space"}


def __getattr__(name: str) -> Any:
    """Import Ray only when a sweep function is used: readers of results (the report) skip its ~2 s import."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pipeline.tuning.{_LAZY[name]}"), name)
