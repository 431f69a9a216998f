"""Ray per-trial overhead: seconds from a trial's start to its first training step, for single-worker trials
(trained in the Tune trial's own process) and multi-worker trials (a Ray Train V2 worker group with DDP).

Each is a real sweep (`run_sweep`, a fresh local Ray, MLflow in the workspace) of small one-epoch char-LSTM
trials on the workspace's data; the overhead is what each trial reports as `startup_seconds` (building the
data module, model, Trainer and, for multi-worker trials, starting the worker group and its process group).
The figures are medians over the trials of one sweep; the sweep's wall time is reported beside them.
"""

from __future__ import annotations

import os
import statistics
import time

from bench.common import Context, Figure, case
from bench.workspace import prepared
from pipeline.params import Params

FAMILY = "lstm_lm"
SMALL_MODEL = {"models.lstm_lm.embed_size": 32, "models.lstm_lm.hidden_size": 64, "models.lstm_lm.layers": 1,
               "train.lstm_lm.batch_size": 32, "train.lstm_lm.bptt": 64}


def sweep_params(ctx: Context, name: str, workers: int, trials: int) -> Params:
    """The workspace params with a small model, a one-epoch sweep of `trials` trials and its own storage."""
    p = prepared(ctx)
    root = ctx.scratch / f"ray_{name}"
    s = f"sweep.{FAMILY}"
    return p.overridden({
        **SMALL_MODEL, "paths.ray_storage": str(root / "ray"), "paths.models": str(root / "models"),
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}", f"{s}.num_samples": trials, f"{s}.max_epochs": 1,
        f"{s}.grace_period": 1, f"{s}.num_workers": workers, f"{s}.cpus_per_worker": 1, f"{s}.max_failures": 0})


def _sweep(ctx: Context, name: str, workers: int, trials: int, target: float | None) -> list[Figure]:
    from pipeline.tuning import run_sweep  # Ray only when this case runs

    p = sweep_params(ctx, name, workers, trials)
    start = time.perf_counter()
    result = run_sweep(p, FAMILY, resume=False)
    wall = time.perf_counter() - start
    startups = [t.startup_seconds for t in result.trials if t.startup_seconds is not None]
    if result.errored or not startups:
        errors = "; ".join(t.error or "" for t in result.trials if t.error)[:300]
        raise RuntimeError(f"the {name} sweep had {result.errored} errored trials: {errors}")
    label = f"{name} trials ({workers} worker{'s' if workers > 1 else ''})"
    value = statistics.median(startups)
    note = f"median of {len(startups)} trials; each: {', '.join(f'{s:.1f}' for s in startups)} s"
    first = (Figure.check(f"{label}: start -> first step", value, "s", "<=", target, spread=[min(startups),
             max(startups)], note=note) if target is not None else
             Figure(f"{label}: start -> first step", value, "s", spread=[min(startups), max(startups)], note=note))
    return [first, Figure(f"{label}: sweep wall time", wall, "s",
                          note=f"{trials} one-epoch trials incl. Ray start/stop and MLflow records")]


@case("ray")
def ray_trial_overhead(ctx: Context) -> list[Figure]:
    """Ray Tune per-trial overhead (trial start to first training step), single- and multi-worker."""
    trials = 1 if ctx.quick else 3
    figures = _sweep(ctx, "single-worker", 1, trials, 10.0)
    workers = min(2, os.cpu_count() or 1)
    if not ctx.quick and workers > 1:
        figures += _sweep(ctx, "multi-worker", workers, 2, None)
    return figures
