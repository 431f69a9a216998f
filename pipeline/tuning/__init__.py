"""Hyperparameter sweeps on Ray Tune: the only package that imports ray.

`search_space` maps params.yaml search spaces to Tune domains, `sample_config` draws what a seeded sweep
runs, `run_sweep` runs (or resumes) one family's sweep and returns a `SweepResult` of `TrialRecord`s
(pipeline/sweep_results.py, which needs no Ray: the report reads results without importing it).
"""

from pipeline.sweep_results import SweepResult, TrialRecord
from pipeline.tuning.space import sample_config, search_space
from pipeline.tuning.sweep import init_ray, run_sweep, sweep_key

__all__ = ["SweepResult", "TrialRecord", "init_ray", "run_sweep", "sample_config", "search_space", "sweep_key"]
