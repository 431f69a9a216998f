"""Looking runs up: searches, one run, a sweep's trials, metric histories and artifacts, as plain data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.redact import redact
from pipeline.tracking.store import _sqlite_file, configure, use


def _record(run: Any) -> dict[str, Any]:
    """A run as plain data: run_id, run_name, status, start/end time (epoch s), tags, params, metrics."""
    info = run.info
    return {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
            "start_time": info.start_time / 1000 if info.start_time else None,
            "end_time": info.end_time / 1000 if info.end_time else None,
            "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": dict(run.data.metrics)}


def tag_filter(tags: Mapping[str, str]) -> str:
    """An MLflow filter string matching every tag exactly (keys quoted, so dotted names work)."""
    for key, value in tags.items():
        if "'" in str(value) or "`" in key:
            raise ValueError(f"tag_filter: cannot match {key}={value!r} (quotes are not supported)")
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def find_runs(uri: str, experiment: str, filter_string: str = "", order_by: list[str] | None = None,
              max_results: int | None = None) -> list[dict[str, Any]]:
    """Runs of `experiment` matching an MLflow filter, newest first unless order_by says otherwise."""
    experiment_id = configure(uri, experiment)
    runs = mlflow.search_runs([experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=order_by or ["attributes.start_time DESC"], output_format="list",
                              max_results=max_results or 100_000)
    return [_record(run) for run in runs]


def get_run(uri: str, run_id: str) -> dict[str, Any]:
    """One run as plain data (see find_runs); MlflowException when there is no such run."""
    use(uri)
    return _record(MlflowClient().get_run(run_id))


def child_runs(uri: str, experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested under parent_run_id (a sweep's trials), oldest first."""
    return find_runs(uri, experiment, tag_filter({"mlflow.parentRunId": parent_run_id}),
                     order_by=["attributes.start_time ASC"])


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is not there (a lookup would create it); servers: True."""
    db = _sqlite_file(uri)
    return db is None or db.is_file()


def resolve_run_id(uri: str, experiment: str, prefix: str) -> str:
    """The run of `experiment` whose id is `prefix` or the only one starting with it (ValueError otherwise)."""
    if not store_exists(uri):
        raise ValueError(f"{redact(uri)}: no MLflow store there (nothing tracked yet); check tracking.uri")
    ids = [r["run_id"] for r in find_runs(uri, experiment) if r["run_id"].startswith(prefix)]
    if prefix in ids:
        return prefix
    if len(ids) != 1:
        found = "no run" if not ids else f"{len(ids)} runs ({', '.join(i[:12] for i in ids[:5])}, ...)"
        raise ValueError(f"run id {prefix!r}: {found} of experiment {experiment!r} start with it; "
                         f"give more of the id (capline runs lists them)")
    return ids[0]


def latest_sweep(uri: str, experiment: str, family: str | None = None) -> dict[str, Any] | None:
    """The most recently started sweep (parent) run, of one family when given (None in a store not yet made)."""
    if not store_exists(uri):
        return None
    tags = {"capline.kind": "sweep", **({"family": family} if family else {})}
    runs = find_runs(uri, experiment, tag_filter(tags), max_results=1)
    return runs[0] if runs else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of one metric, in step order."""
    use(uri)
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths directly under `path` of a run."""
    use(uri)
    return [f.path for f in MlflowClient().list_artifacts(run_id, path)]


def run_exists(uri: str, run_id: str) -> bool:
    """Whether `run_id` is a run of the store at `uri`."""
    use(uri)
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def load_artifact_dict(uri: str, run_id: str, artifact_file: str) -> dict[str, Any]:
    """A JSON artifact of a run (e.g. "sweep/summary.json"); FileNotFoundError naming it when absent."""
    use(uri)
    try:
        data = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError) as err:
        raise FileNotFoundError(f"MLflow run {run_id}: no artifact {artifact_file} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"MLflow run {run_id}: {artifact_file} is not a JSON object")
    return data
