"""MLflow tracking: the only module that imports mlflow.

Runs live in a database store (default `sqlite:///mlflow.db`); file stores (./mlruns) are refused.
For a SQLite store, artifacts go to `mlartifacts/` next to the database file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:  # Lightning (and torch) load only when a logger is asked for
    from pytorch_lightning.loggers import MLFlowLogger

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
MAX_TAG_VALUE = 8000
MAX_KEY = 250
HOST_TAG, PID_TAG = "capline.host", "capline.pid"  # who owns a RUNNING run (see mark_stale_runs)
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# A tracking server must answer its /health page within this many seconds, once per process: MLflow's own
# client retries an unreachable server for about 4 minutes per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES),
# which is right for a blip mid-run but not for a server that is not there when a run starts.
PROBE_TIMEOUT = 10.0
_answered: set[str] = set()  # servers that answered in this process


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for in-memory or other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _artifact_location(uri: str) -> str | None:
    """mlartifacts/ beside a SQLite file; None lets a server or other database decide."""
    db = _sqlite_file(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db else None


def configure(uri: str, experiment: str) -> str:
    """Point MLflow at `uri`, create or get `experiment`; return its id."""
    scheme = urlparse(uri).scheme
    if not scheme or scheme == "file" or len(scheme) == 1:  # len 1: a Windows drive letter
        raise ValueError(f"tracking.uri {uri!r}: file stores (./mlruns) are not supported; use a "
                         f"database such as sqlite:///mlflow.db or a server http://host:5000")
    db = _sqlite_file(uri)
    if db is not None:
        db.resolve().parent.mkdir(parents=True, exist_ok=True)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client.create_experiment(experiment, artifact_location=_artifact_location(uri))
        except MlflowException:  # created meanwhile by a parallel process (a sweep)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", experiment)
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def check_server(uri: str) -> None:
    """Fail fast, naming tracking.uri, when an http(s) tracking server does not answer GET /health."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https") or uri in _answered:
        return
    shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()  # never a password in a message
    hint = "start the server, fix tracking.uri, or track locally with tracking.uri: sqlite:///mlflow.db"
    try:
        with urllib.request.urlopen(f"{shown.rstrip('/')}/health", timeout=PROBE_TIMEOUT) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except urllib.error.URLError as err:
        if not isinstance(err.reason, ssl.SSLError):  # TLS trouble: it answered; MLflow has its own TLS settings
            raise ConnectionError(f"tracking.uri {shown}: MLflow server unreachable ({err.reason}); {hint}") from None
        status = 200
    except (OSError, ValueError) as err:  # a timeout while reading, a reset connection, a malformed address
        raise ConnectionError(f"tracking.uri {shown}: MLflow server unreachable ({err}); {hint}") from None
    if status >= 500:  # e.g. a proxy in front of a server that is down
        raise ConnectionError(f"tracking.uri {shown}: MLflow server answers HTTP {status} on /health; {hint}")
    _answered.add(uri)


def _run_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow text, plus this process's host and pid (to tell a live run from a crashed one)."""
    out = {_key(k): _value(v, MAX_TAG_VALUE, k) for k, v in (tags or {}).items()}
    return {**out, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def lightning_logger(
    uri: str, experiment: str, run_name: str, tags: Mapping[str, Any], run_id: str | None = None
) -> MLFlowLogger:
    """A Lightning MLFlowLogger that never logs checkpoints (we log the best one ourselves).

    With run_id it logs into that run (e.g. a sweep trial made by start_run(parent_run_id=...)).
    """
    from pytorch_lightning.loggers import MLFlowLogger

    configure(uri, experiment)
    all_tags = _run_tags(tags)
    logger = MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=uri,
                          tags=all_tags, log_model=False,
                          artifact_location=_artifact_location(uri), run_id=run_id)
    if run_id is not None:  # Lightning applies tags only to runs it creates
        set_tags(run_id, all_tags)
    return logger


class TrackedRun:
    """An active run: `with start_run(...) as run:` ends it FINISHED, FAILED or KILLED."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        end_run(status, self.run_id)


def start_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> TrackedRun:
    """Start an active run (nested under parent_run_id when given, even from another process)."""
    experiment_id = configure(uri, experiment)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=_run_tags(tags),
                           parent_run_id=parent_run_id, nested=parent_run_id is not None)
    return TrackedRun(run.info.run_id, experiment_id)


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
        raise ValueError("no active MLflow run: pass run_id or use start_run()")
    return active.info.run_id


def _key(key: str) -> str:
    """An MLflow-safe key: allowed characters only, no empty or relative path segments."""
    key = re.sub(r"[^A-Za-z0-9_./\- ]", "_", str(key))
    parts = [p if p != ".." else "__" for p in key.split("/") if p not in ("", ".")]
    return "/".join(parts)[:MAX_KEY] or "_"


def _value(value: Any, limit: int, key: str) -> str:
    """Strings as they are, anything else as JSON; cut to MLflow's limit with a warning."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > limit:
        log.warning("MLflow value of %s is %d characters; truncated to %d", key, len(text), limit)
        text = text[: limit - 3] + "..."
    return text


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _log_batch(run_id: str | None, field: str, items: list, size: int) -> None:
    """log_batch in chunks of MLflow's per-request limit (100 params or tags, 1000 metrics)."""
    client, rid = MlflowClient(), _run_id(run_id)
    for start in range(0, len(items), size):
        client.log_batch(rid, **{field: items[start:start + size]})


def log_params_flat(run_id: str | None, params: Mapping[str, Any]) -> dict[str, str]:
    """Log nested params as dotted keys (values as JSON text); return what was logged."""
    flat = {_key(k): _value(v, MAX_PARAM_VALUE, k) for k, v in flatten(params).items()}
    _log_batch(run_id, "params", [Param(k, v) for k, v in flat.items()], 100)
    return flat


def log_metrics(run_id: str | None, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numeric leaves of a (nested) metrics dict at `step`; None and text are skipped."""
    now = int(time.time() * 1000)
    flat = {_key(k): float(v) for k, v in flatten(metrics).items()
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


def set_tags(run_id: str | None, tags: Mapping[str, Any]) -> None:
    """Set run tags (values as text)."""
    _log_batch(run_id, "tags", [RunTag(_key(k), _value(v, MAX_TAG_VALUE, k)) for k, v in tags.items()], 100)


def _git(repo: Path, *args: str) -> str | None:
    """Output of a read-only git command in repo, or None outside git."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _dvc_outs(lock: Path) -> dict[str, str]:
    """dvc.<out path> -> md5 for every stage's outs in dvc.lock."""
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{lock}: not valid YAML: {err}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        raise ValueError(f"{lock}: expected a mapping under 'stages'")
    tags = {}
    for name, stage in stages.items():
        for i, out in enumerate((stage or {}).get("outs") or []):
            if not isinstance(out, dict) or "path" not in out or "md5" not in out:
                raise ValueError(f"{lock}: stages.{name}.outs[{i}]: expected 'path' and 'md5'")
            tags[_key(f"dvc.{out['path']}")] = str(out["md5"])
    return tags


def lineage_tags(repo_dir: str | Path) -> dict[str, str]:
    """git.commit, git.dirty ("unknown" outside git) and dvc.<out> md5s from dvc.lock."""
    repo = Path(repo_dir)
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain") if commit else None
    tags = {"git.commit": commit.strip() if commit else "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower()}
    lock = repo / "dvc.lock"
    if lock.is_file():
        tags.update(_dvc_outs(lock))
    return tags


def params_hash(params: Mapping[str, Any]) -> str:
    """First 12 hex of the sha256 of the canonical JSON of params (key order does not matter)."""
    try:
        text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"params_hash: params must be plain JSON data: {err}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


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


# ---- runs that are not the process's active run (Ray trials, sweeps), and looking runs up ----------------


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
    mlflow.set_tracking_uri(uri)
    return _record(MlflowClient().get_run(run_id))


def child_runs(uri: str, experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested under parent_run_id (a sweep's trials), oldest first."""
    return find_runs(uri, experiment, tag_filter({"mlflow.parentRunId": parent_run_id}),
                     order_by=["attributes.start_time ASC"])


def latest_sweep(uri: str, experiment: str, family: str | None = None) -> dict[str, Any] | None:
    """The most recently started sweep (parent) run, of one family when given."""
    tags = {"capline.kind": "sweep", **({"family": family} if family else {})}
    runs = find_runs(uri, experiment, tag_filter(tags), max_results=1)
    return runs[0] if runs else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of one metric, in step order."""
    mlflow.set_tracking_uri(uri)
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def log_figure(run_id: str | None, figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as an artifact (e.g. "sweep/metric_vs_params.png")."""
    MlflowClient().log_figure(_run_id(run_id), figure, artifact_file)


def log_dict(run_id: str | None, data: Mapping[str, Any], artifact_file: str) -> None:
    """Save plain data as a JSON (or YAML, by extension) artifact."""
    MlflowClient().log_dict(_run_id(run_id), dict(data), artifact_file)


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths directly under `path` of a run."""
    mlflow.set_tracking_uri(uri)
    return [f.path for f in MlflowClient().list_artifacts(run_id, path)]


def run_exists(uri: str, run_id: str) -> bool:
    """Whether `run_id` is a run of the store at `uri`."""
    mlflow.set_tracking_uri(uri)
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def load_artifact_dict(uri: str, run_id: str, artifact_file: str) -> dict[str, Any]:
    """A JSON artifact of a run (e.g. "sweep/summary.json"); FileNotFoundError naming it when absent."""
    mlflow.set_tracking_uri(uri)
    try:
        data = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError) as err:
        raise FileNotFoundError(f"MLflow run {run_id}: no artifact {artifact_file} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"MLflow run {run_id}: {artifact_file} is not a JSON object")
    return data


# ---- model registry -------------------------------------------------------------------------------------
class CaplineModel(mlflow.pyfunc.PythonModel):
    """A trained capline checkpoint as an MLflow pyfunc model.

    Captioner: a DataFrame with an `image` column of encoded image bytes (or base64 text) -> captions.
    Language models: a `prompt` column -> the prompt continued by `length` sampled tokens.
    """

    def __init__(self, family: str, beam_size: int = 3, alpha: float = 0.7, length: int = 200,
                 temperature: float = 0.8) -> None:
        self.family, self.beam_size, self.alpha = family, beam_size, alpha
        self.length, self.temperature = length, temperature

    def load_context(self, context: Any) -> None:
        from pipeline.training.fit import load_module

        self.module = load_module(self.family, context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # no hints: MLflow would try to enforce them
        from pipeline import inference

        if self.family == "captioner":
            return inference.caption_bytes(self.module, list(model_input["image"]), self.beam_size, self.alpha)
        return [inference.generate(self.module, str(prompt), self.length, self.temperature)
                for prompt in model_input["prompt"]]


def register_checkpoint(uri: str, run_id: str, family: str, checkpoint: str | Path,
                        alias: str = "champion") -> dict[str, str]:
    """Log `checkpoint` as a pyfunc model in run `run_id` and register it as `capline-<family>`@alias."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CaplineModel(family), artifacts={"checkpoint": str(checkpoint)},
            # explicit requirements: inferring them would load the model in a subprocess (slow)
            pip_requirements=["torch", "pytorch-lightning", "pillow", "numpy", "nltk", "pydantic"])
    name = f"capline-{family}"
    version = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": str(version.version), "alias": alias, "uri": f"models:/{name}@{alias}"}


def serve_command(uri: str, family: str, alias: str = "champion", host: str = "127.0.0.1", port: int = 5001,
                  workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of `mlflow models serve` for `capline-<family>@alias` from the store at uri.

    `--env-manager local`: the model runs in this environment (capline and torch are already here).
    """
    model_uri = f"models:/capline-{family}@{alias}"
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", str(workers)]
    return argv, {"MLFLOW_TRACKING_URI": uri}
