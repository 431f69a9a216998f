"""Runs: starting and ending them (also from other processes: Ray trials, sweeps), and logging into them."""

from __future__ import annotations

import logging
import numbers
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.tracking import MlflowClient

from pipeline.params import flatten_keys
from pipeline.tracking.store import (
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    artifact_location,
    configure,
    mlflow_key,
    mlflow_value,
    without_login,
)

if TYPE_CHECKING:  # Lightning (and torch) load only when a logger is asked for
    from pytorch_lightning.loggers import MLFlowLogger

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG = "capline.host", "capline.pid"  # who owns a RUNNING run (see mark_stale_runs)
END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _run_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow text, plus this process's host and pid (to tell a live run from a crashed one)."""
    out = {mlflow_key(k): mlflow_value(v, MAX_TAG_VALUE, k) for k, v in (tags or {}).items()}
    return {**out, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def lightning_logger(
    uri: str, experiment: str, run_name: str, tags: Mapping[str, Any], run_id: str | None = None,
    ends_run: bool = True,
) -> MLFlowLogger:
    """A Lightning MLFlowLogger that never logs checkpoints (we log the best one ourselves).

    With run_id it logs into that run (e.g. a sweep trial made by create_run(parent_run_id=...)). With
    ends_run=False it only logs: whoever owns the run ends it (a sweep trial's driver, see tuning.trial).
    """
    from pytorch_lightning.loggers import MLFlowLogger

    class ParamsOnce(MLFlowLogger):
        def log_hyperparams(self, params: Any) -> None:
            """Skip Lightning's dump of the module's hyperparameters: the caller logs the run's params once,
            by their params.yaml names (log_params_flat), where the dump would repeat them as model/*, train/*
            and add the whole vocabulary."""

    class LoggingOnly(ParamsOnce):
        def finalize(self, status: str = "success") -> None:
            """Leave the run's status alone: a killed attempt's late teardown must not end a retried run."""

    configure(uri, experiment)
    all_tags = _run_tags(tags)
    logger = (ParamsOnce if ends_run else LoggingOnly)(
        experiment_name=experiment, run_name=run_name, tracking_uri=without_login(uri), tags=all_tags,
        log_model=False, artifact_location=artifact_location(uri), run_id=run_id)
    if run_id is not None:  # Lightning applies tags only to runs it creates
        set_tags(run_id, all_tags)
    return logger


def end_run(status: str = "FINISHED", run_id: str | None = None, end_time: float | None = None) -> None:
    """End run_id (default: the active run) with FINISHED, FAILED or KILLED (at end_time, epoch seconds)."""
    if status not in END_STATUSES:
        raise ValueError(f"end_run: status must be one of {END_STATUSES}, got {status!r}")
    active = mlflow.active_run()
    if run_id is None or (active is not None and active.info.run_id == run_id):
        mlflow.end_run(status)
    else:
        ms = int(end_time * 1000) if end_time is not None else None
        MlflowClient().set_terminated(run_id, status, end_time=ms)


def _run_id(run_id: str | None) -> str:
    """The given run id, or the active run's."""
    if run_id is not None:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise ValueError("no active MLflow run: pass run_id")
    return active.info.run_id


def _log_batch(run_id: str | None, field: str, items: list, size: int) -> None:
    """log_batch in chunks of MLflow's per-request limit (100 params or tags, 1000 metrics)."""
    client, rid = MlflowClient(), _run_id(run_id)
    for start in range(0, len(items), size):
        client.log_batch(rid, **{field: items[start:start + size]})


def log_params_flat(run_id: str | None, params: Mapping[str, Any]) -> dict[str, str]:
    """Log nested params as dotted keys (values as JSON text); return what was logged.

    The `tracking` section is left out: it says where the run is recorded, not what it computed, and
    tracking.uri may hold a password.
    """
    flat = {mlflow_key(k): mlflow_value(v, MAX_PARAM_VALUE, k) for k, v in flatten_keys(params).items()
            if not k.startswith("tracking.")}
    _log_batch(run_id, "params", [Param(k, v) for k, v in flat.items()], 100)
    return flat


def log_metrics(run_id: str | None, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numeric leaves of a (nested) metrics dict at `step`; None and text are skipped."""
    now = int(time.time() * 1000)
    flat = {mlflow_key(k): float(v) for k, v in flatten_keys(metrics).items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}
    _log_batch(run_id, "metrics", [Metric(k, v, now, step or 0) for k, v in flat.items()], 1000)
    return flat


def log_artifact(run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a folder's contents under artifact_path."""
    path = Path(path)
    client, rid = MlflowClient(), _run_id(run_id)
    if path.is_dir():
        client.log_artifacts(rid, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(rid, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"log_artifact: {path} does not exist")


def log_figure(run_id: str | None, figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as an artifact (e.g. "sweep/metric_vs_params.png")."""
    MlflowClient().log_figure(_run_id(run_id), figure, artifact_file)


def log_dict(run_id: str | None, data: Mapping[str, Any], artifact_file: str) -> None:
    """Save plain data as a JSON (or YAML, by extension) artifact."""
    MlflowClient().log_dict(_run_id(run_id), dict(data), artifact_file)


def set_tags(run_id: str | None, tags: Mapping[str, Any]) -> None:
    """Set run tags (values as text)."""
    _log_batch(run_id, "tags", [RunTag(mlflow_key(k), mlflow_value(v, MAX_TAG_VALUE, k)) for k, v in tags.items()], 100)


def create_run(uri: str, experiment: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
               parent_run_id: str | None = None) -> str:
    """Start a run without making it this process's active run (nested under parent_run_id when given)."""
    experiment_id = configure(uri, experiment)
    all_tags = _run_tags(tags)
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id  # what MLflow's UI nests by
    return MlflowClient().create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id


def reopen_run(run_id: str) -> None:
    """Mark an ended run RUNNING again, owned by this process (a resumed sweep, a retried trial)."""
    MlflowClient().update_run(run_id, status="RUNNING")
    set_tags(run_id, {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})


def _is_stale(tags: Mapping[str, str]) -> bool:
    """No owner recorded, or an owner on this host whose pid is gone (a reused pid looks alive)."""
    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG, "")
    if host is None or not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False  # another machine's process cannot be checked from here: leave it
    try:
        os.kill(int(pid), 0)  # signal 0: existence check only
    except (ProcessLookupError, OverflowError):  # gone (or not a pid at all)
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def mark_stale_runs(uri: str, experiment: str, status: str = "KILLED") -> list[str]:
    """End RUNNING runs whose process is gone; return their ids.

    Runs started through this module record capline.host and capline.pid: one whose process is
    alive, or that belongs to another host, is left alone. Runs without those tags are ended.
    """
    if status not in END_STATUSES:
        raise ValueError(f"mark_stale_runs: status must be one of {END_STATUSES}, got {status!r}")
    running = mlflow.search_runs([configure(uri, experiment)], "attributes.status = 'RUNNING'",
                                 run_view_type=ViewType.ACTIVE_ONLY, output_format="list")  # pages itself
    stale = [run.info.run_id for run in running if _is_stale(run.data.tags)]
    client = MlflowClient()
    for run_id in stale:
        client.set_terminated(run_id, status)
        log.info("marked stale MLflow run %s as %s", run_id, status)
    return stale
