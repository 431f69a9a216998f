"""From Tune's ResultGrid to trial records, and each trial's MLflow run finished with what it achieved."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from pipeline import tracking
from pipeline.sweep_results import SweepResult, TrialRecord
from pipeline.tuning.space import plain
from pipeline.tuning.trial import CKPT_NAME, TrialContext


def trial_id_of(result: Any) -> str:
    """A trial's id from its folder name (see sweep.trial_dirname): results of errored trials lack metrics."""
    return result.path.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _uri(path: str, storage: str) -> str:
    """A storage path as Ray hands it (no scheme on remote storage) as something Checkpoint(path) opens."""
    scheme = storage.split("://", 1)[0] if "://" in storage else None
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def best_checkpoint(result: Any, key: str, mode: str, storage: str) -> str | None:
    """The Lightning checkpoint of the trial's best reported epoch (a local path or a storage URI).

    Single-worker trials report Tune checkpoints (result.best_checkpoints); multi-worker trials' checkpoints
    live in their Ray Train run and reach Tune as the `checkpoint_path` of each report.
    """
    candidates = [(_finite(m.get(key)), c.path) for c, m in (result.best_checkpoints or [])]
    frame = result.metrics_dataframe
    if frame is not None and "checkpoint_path" in frame and key in frame:
        candidates += [(_finite(v), p) for v, p in zip(frame[key], frame["checkpoint_path"], strict=True)
                       if isinstance(p, str)]
    candidates = [(v, _uri(folder, storage)) for v, folder in candidates]
    best: tuple[float, str] | None = None
    for value, folder in candidates:
        if value is not None and (best is None or _better(value, best[0], mode)):
            best = (value, folder)
    return f"{best[1].rstrip('/')}/{CKPT_NAME}" if best else None


def _saved_config(trial_path: str) -> dict[str, Any]:
    """The params.json Tune writes into every trial folder (a trial that never reported has no config)."""
    fs, inner = pafs.FileSystem.from_uri(trial_path) if "://" in trial_path else (pafs.LocalFileSystem(), trial_path)
    try:
        with fs.open_input_stream(f"{inner.rstrip('/')}/params.json") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (FileNotFoundError, OSError, ValueError):
        return {}


def _error(result: Any) -> str | None:
    """The exception's own last line ("module.Error: message"), not Ray's traceback around it."""
    err = result.error
    if err is None:
        return None
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if ln.strip()]
    return (lines[-1].strip() if lines else type(err).__name__)[:4000]


def record(result: Any, run: dict | None, ctx: TrialContext, key: str, mode: str, seed: int) -> TrialRecord:
    """One trial's record from its Tune result and its MLflow run."""
    metrics = result.metrics or {}
    frame = result.metrics_dataframe
    reported = [_finite(x) for x in frame[key]] if frame is not None and key in frame else []
    values = [v for v in reported if v is not None]
    error = _error(result)
    metric = None
    if not error and values:
        metric = max(values) if mode == "max" else min(values)
    status = "errored" if error else ("completed" if metrics.get("final_epoch") else "early_stopped")
    wall = float(metrics.get("time_total_s") or 0.0)
    held = wall * ctx.num_workers
    config = {k: plain(v) for k, v in (result.config or _saved_config(result.path)).items()}
    checkpoint = best_checkpoint(result, key, mode, ctx.train_storage) if metric is not None else None
    return TrialRecord(
        trial_id=trial_id_of(result), run_id=run["run_id"] if run else None, status=status, config=config,
        metric=metric, epochs=int(metrics.get("epoch") or 0), seed=int(config.get("seed", seed)),
        node_id=metrics.get("node_id"), checkpoint=checkpoint,
        error=error, cpu_seconds=held * ctx.cpus_per_worker, gpu_seconds=held * ctx.gpus_per_worker,
        wall_seconds=wall, startup_seconds=_finite(metrics.get("startup_seconds")))


def children(ctx: TrialContext) -> dict[str, dict]:
    """The sweep's trial runs by Ray trial id."""
    runs = tracking.child_runs(ctx.uri, ctx.experiment, ctx.parent_run_id)
    return {r["tags"]["ray.trial_id"]: r for r in runs if "ray.trial_id" in r["tags"]}


def trial_records(grid: Any, ctx: TrialContext, key: str, mode: str, seed: int) -> list[TrialRecord]:
    """Every trial of the ResultGrid, ordered by trial id."""
    runs = children(ctx)
    out = [record(result, runs.get(trial_id_of(result)), ctx, key, mode, seed) for result in grid]
    return sorted(out, key=lambda t: t.trial_id)


def log_checkpoint(run_id: str, checkpoint: str) -> None:
    """Upload a trial's best checkpoint as checkpoints/best.ckpt (fetched first from remote storage)."""
    folder, _, name = checkpoint.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="capline-best-") as tmp:
        source = Path(checkpoint) if "://" not in folder else Path(tune.Checkpoint(folder).to_directory(tmp)) / name
        target = Path(tmp, "best.ckpt")
        shutil.copyfile(source, target)
        tracking.log_artifact(run_id, target, "checkpoints")


def finish_children(result: SweepResult, ctx: TrialContext, grid: Any) -> None:
    """End every trial run with its outcome: status, sweep.status tag, best metric and best checkpoint."""
    runs = children(ctx)
    ended = {trial_id_of(r): _finite((r.metrics or {}).get("timestamp")) for r in grid}
    metric = f"best_{result.monitor.replace('/', '_')}"
    for trial in result.trials:
        run = runs.get(trial.trial_id)
        if run is None:
            continue
        tags = {"sweep.status": trial.status}
        if trial.error and "NonFiniteLossError" in trial.error:
            tags["diverged"] = "true"
        if trial.checkpoint and run["tags"].get("checkpoint") != trial.checkpoint:
            log_checkpoint(run["run_id"], trial.checkpoint)
            tags["checkpoint"] = trial.checkpoint
        compute = {"cpu_seconds": trial.cpu_seconds, "gpu_seconds": trial.gpu_seconds,
                   "wall_seconds": trial.wall_seconds}
        tracking.log_metrics(run["run_id"], {**compute, **({metric: trial.metric} if trial.metric is not None else {})})
        tracking.set_tags(run["run_id"], tags)
        status = "FAILED" if trial.status == "errored" else "FINISHED"
        if run["status"] != status:
            end = ended.get(trial.trial_id) if status == "FINISHED" else None
            tracking.end_run(status, run["run_id"], end_time=end or time.time())
