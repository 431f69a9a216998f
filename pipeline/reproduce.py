"""Rerun one sweep trial outside Ray from what MLflow recorded, and check its metric comes back."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.families import FAMILIES
from pipeline.params import Params, flatten_keys, validate_params
from pipeline.training.fit import run_params, train


def _parse(logged: str, template: Any) -> Any:
    """A logged param back to its value: strings were logged as is, everything else as JSON."""
    if isinstance(template, str) and logged != "null":
        return logged
    try:
        return json.loads(logged)
    except json.JSONDecodeError:
        return logged


def recorded_params(current: Params, logged: dict[str, str]) -> tuple[Params, list[str]]:
    """The trial's params rebuilt from its logged flat params (current params fill keys it lacks)."""
    tree = current.to_dict()
    missing = []
    for dotted, template in flatten_keys(tree).items():
        if dotted not in logged:
            missing.append(dotted)
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = _parse(logged[dotted], template)
    return validate_params(tree, source="recorded trial params"), missing


def best_recorded(uri: str, run_id: str, monitor: str, mode: str) -> float | None:
    """The best value of the monitored metric over the trial's epochs."""
    for key in (monitor, monitor.replace("/", "_")):
        values = [v for _, v in tracking.metric_history(uri, run_id, key) if math.isfinite(v)]
        if values:
            return max(values) if mode == "max" else min(values)
    return None


def reproduce_trial(p: Params, run_id: str, tolerance: float) -> dict[str, Any]:
    """Retrain the trial `run_id` (same config, seed and epochs) and compare its metric with the record."""
    run = tracking.get_run(p.tracking.uri, run_id)
    family = run["tags"].get("family")
    if family not in FAMILIES:
        raise ValueError(f"MLflow run {run_id} is not a capline trial (tag 'family' is {family!r})")
    monitor, mode = FAMILIES[family].monitor, FAMILIES[family].mode
    recorded = best_recorded(p.tracking.uri, run_id, monitor, mode)
    if recorded is None:
        raise ValueError(f"MLflow run {run_id} has no finite {monitor} to reproduce (status {run['status']})")
    trial_params, missing = recorded_params(p, run["params"])
    logged_by_trials = flatten_keys(run_params(p, family))  # the rest of params is not the trial's to log
    missing = [key for key in missing if key in logged_by_trials]
    now = tracking.lineage_tags(Path.cwd())
    data_changed = sorted(k for k, v in run["tags"].items() if k.startswith("dvc.") and now.get(k) != v)
    with tempfile.TemporaryDirectory(prefix="capline-reproduce-") as scratch:
        rerun = validate_params({**trial_params.to_dict(),
                                 "paths": {**trial_params.paths.model_dump(), "models": scratch}})
        result = train(rerun, family, logger=False, enable_progress_bar=False)
    difference = abs(result.best_score - recorded) / max(abs(recorded), 1e-12)
    return {"run_id": run_id, "family": family, "monitor": monitor, "recorded": recorded,
            "reproduced": result.best_score, "relative_difference": difference, "tolerance": tolerance,
            "within_tolerance": difference <= tolerance, "seed": trial_params.seed,
            "data_changed": data_changed, "params_not_recorded": missing}
