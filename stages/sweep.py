"""Hyperparameter sweep of one model family on Ray Tune (random log-scale search, ASHA), in MLflow.

DVC stage `sweep@<family>`: params `seed`, `sweep.<family>`, `models.<family>`, `train.<family>`, `tracking`;
prepared data -> {paths.sweeps}/<family>/best.json, metrics/sweep_<family>.json.
Ray's trial folders live in {paths.ray_storage}, outside DVC outputs; rerunning an interrupted sweep resumes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.families import FAMILIES
from pipeline.io import write_json, write_metrics
from pipeline.params import Params, load_params
from pipeline.tuning import run_sweep
from stages import best_path, entry


class NoTrialFinished(RuntimeError):
    """Every trial of a sweep errored or diverged: there is no configuration to train."""


def run(p: Params, family: str, address: str | None = None) -> dict:
    """Sweep `family`; write best.json (the winning overrides) and metrics/sweep_<family>.json."""
    result = run_sweep(p, family, address=address or p.sweep.ray_address)
    monitor = FAMILIES[family].monitor
    if result.best is None:
        raise NoTrialFinished(
            f"sweep {family}: no trial finished with a finite {monitor} ({result.errored} of "
            f"{len(result.trials)} errored; see MLflow run {result.parent_run_id}): narrow sweep.{family}.space "
            f"(e.g. smaller learning rates) and run it again")
    metrics = result.to_metrics()
    write_json(best_path(p, family), {"family": family, "monitor": monitor, "metric": result.best.metric,
                                      "overrides": result.best.config, "trial_id": result.best.trial_id,
                                      "run_id": result.best.run_id, "sweep_run_id": result.parent_run_id})
    write_metrics(Path(p.paths.metrics) / f"sweep_{family}.json", metrics)
    print(f"sweep {family}: {metrics['trials']} trials ({metrics['completed']} completed, "
          f"{metrics['early_stopped']} stopped early, {metrics['errored']} errored) in "
          f"{metrics['wall_seconds']:.0f} s; best {monitor} {result.best.metric:.4f} "
          f"with {result.best.config}")
    for t in result.trials:  # the trials table (MLflow's compare view and `capline runs` have the rest)
        value = "-" if t.metric is None else f"{t.metric:.4f}"
        config = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                           for k, v in t.config.items())
        print(f"  {'*' if t is result.best else ' '} {t.trial_id}  {t.status:<13} {t.epochs:>3} epochs  "
              f"{monitor} {value:>8}  {config}")
    return metrics


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python -m stages.sweep {{{','.join(FAMILIES)}}}")
    entry(lambda: run(load_params(), sys.argv[1]))


if __name__ == "__main__":
    main()
