"""Tiny trained models of every family, evaluated, plus a sweep's MLflow summary: what the report reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.families import FAMILIES
from pipeline.io import write_json
from pipeline.params import Params
from tests.conftest import params_under

SWEPT = "lstm_lm"  # the family given a sweep; the others show "no sweep yet"


def report_params(prepared: Params, root: Path, **overrides: object) -> Params:
    """The session's prepared data; models, evaluations, metrics, MLflow and the report under root."""
    return params_under(prepared, root, **{"paths.reports": str(root / "reports"),
                                           "paths.evaluation": str(root / "evaluation"), **overrides})


def log_a_sweep(p: Params, family: str) -> dict:
    """A sweep's MLflow parent run and metrics file, written by the sweep's own summary code (no Ray trials).

    Configurations come from the family's real search space (sample_config); one trial is stopped early
    by ASHA and one errored, as in a real sweep.
    """
    from pipeline.sweep_results import summarise
    from pipeline.tuning import TrialRecord, sample_config
    from pipeline.tuning.sweep import log_summary

    space = dict(getattr(p.sweep, family).space)
    monitor, mode = FAMILIES[family].monitor, FAMILIES[family].mode
    configs = sample_config(space, 5, seed=p.seed)
    statuses = ["completed", "early_stopped", "completed", "errored", "completed"]
    trials = [TrialRecord(f"t{i}", None, status, config, None if status == "errored" else 2.0 + 0.1 * i,
                          1 if status == "early_stopped" else 2, p.seed, None, None,
                          "boom" if status == "errored" else None, 2.0, 0.0, 1.0)
              for i, (status, config) in enumerate(zip(statuses, configs, strict=True))]
    parent = tracking.create_run(p.tracking.uri, p.tracking.experiment, f"sweep-{family}",
                                 tags={"capline.kind": "sweep", "family": family})
    result = summarise(family, monitor, mode, trials, experiment_path="unused", parent_run_id=parent,
                       wall_seconds=3.0, epochs_budget=10)
    log_summary(result, space)
    tracking.end_run("FINISHED", parent)
    metrics = result.to_metrics()
    write_json(Path(p.paths.metrics) / f"sweep_{family}.json", metrics)
    return metrics


@pytest.fixture(scope="session")
def trained(prepared_params, tmp_path_factory) -> Params:
    """Every family trained one tiny epoch and evaluated; a logged sweep for SWEPT."""
    from stages import evaluate as evaluate_stage
    from stages import train as train_stage

    p = report_params(prepared_params, tmp_path_factory.mktemp("report"))
    for family in FAMILIES:
        train_stage.run(p, family)
        evaluate_stage.run(p, family)
    # the data stages' metrics live with the prepared data: copy two so the metrics table has them
    for name in ("embeddings.json", "vocab.json"):
        (Path(p.paths.metrics) / name).write_bytes((Path(prepared_params.paths.metrics) / name).read_bytes())
    log_a_sweep(p, SWEPT)
    return p


@pytest.fixture(scope="session")
def built(trained) -> tuple[Params, dict]:
    """The report stage run once on the trained models: (params, its metrics)."""
    from stages import report as report_stage

    # repo_dir: the test's folder (no git, so no `dvc metrics diff`), never the project's own repository
    return trained, report_stage.run(trained, repo_dir=Path(trained.paths.reports).parent, progress=False)
