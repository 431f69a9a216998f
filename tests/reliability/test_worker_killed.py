"""A Ray Train worker of a 2-worker DDP trial is SIGKILLed mid-run: the trial resumes from its last checkpoint
(Tune's FailureConfig retries it; Ray Train restores the run's latest checkpoint) and ends with every step once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline import tracking
from pipeline.training import fit
from pipeline.tuning import run_sweep
from tests.tuning.test_sweep import FAMILY, _result_rows, sweep_params, trial_params

EPOCHS = 12  # long enough to kill a worker after the first checkpoint and before the end

pytestmark = pytest.mark.slow


def train_workers() -> list[psutil.Process]:
    """Ray Train workers of the Ray this test process started (its descendants; other Rays are not touched)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def checkpoints(storage: Path) -> list[Path]:
    """Lightning files of every checkpoint Ray Train has kept for the (one) trial, oldest first."""
    return sorted(storage.glob("sweep-*.train/trial-*/checkpoint_*/epoch.ckpt"), key=lambda p: p.stat().st_mtime)


def registered_epochs(storage: Path) -> int:
    """Epochs of the latest checkpoint Ray Train has registered (what a restart restores), 0 if none yet."""
    for path in storage.glob("sweep-*.train/trial-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(path.read_text())["latest_checkpoint_result"]
        except (ValueError, KeyError, OSError):  # being written
            continue
        return latest["metrics"]["epoch"] if latest else 0
    return 0


def failures(storage: Path) -> list[int]:
    """How often Tune saw each trial fail, from its saved experiment state."""
    (state,) = storage.glob("sweep-*/experiment_state-*.json")
    return [json.loads(runtime)["num_failures"] for _, runtime in json.loads(state.read_text())["trial_data"]]


def steps_per_epoch(p, config: dict) -> int:
    """Optimizer steps of one epoch on one of two ranks (each rank trains on its half of the rows)."""
    tp = trial_params(p, config)
    dm = fit.build_datamodule(tp, FAMILY, fit.vocabulary(tp, FAMILY))
    dm.shard(0, 2)
    return len(dm.train_dataloader())


def test_a_killed_ddp_worker_resumes_from_the_last_checkpoint_without_repeating_steps(
        ray_with_dashboard, prepared_params, tmp_path):
    p = sweep_params(prepared_params, tmp_path, **{
        f"sweep.{FAMILY}.num_workers": 2, f"sweep.{FAMILY}.cpus_per_worker": 1, f"sweep.{FAMILY}.num_samples": 1,
        f"sweep.{FAMILY}.max_epochs": EPOCHS, f"sweep.{FAMILY}.grace_period": EPOCHS,
        f"sweep.{FAMILY}.max_failures": 1})
    storage = tmp_path / "ray" / FAMILY
    outcome: dict = {}
    sweep = threading.Thread(target=lambda: outcome.update(result=run_sweep(p, FAMILY)))
    sweep.start()
    deadline = time.time() + 600  # liveness only: a loaded 2-core machine starts Ray workers slowly
    while (kept := registered_epochs(storage)) < 2 or len(train_workers()) < 2:  # two epochs checkpointed
        assert sweep.is_alive() and time.time() < deadline, "the trial ended before a worker could be killed"
        time.sleep(0.1)
    os.kill(train_workers()[-1].pid, signal.SIGKILL)  # while it trains a later epoch
    sweep.join(timeout=900)
    assert not sweep.is_alive()
    result = outcome["result"]

    (trial,) = result.trials
    assert trial.status == "completed" and trial.epochs == EPOCHS and result.errored == 0
    assert failures(storage) == [1]  # the kill failed the trial once; FailureConfig(max_failures=1) retried it
    assert _result_rows(storage)[-1]["epoch"] == EPOCHS  # Tune saw the retry through to the last epoch
    per_epoch = steps_per_epoch(p, trial.config)
    final = torch.load(checkpoints(storage)[-1], map_location="cpu", weights_only=True)
    assert final["epoch"] == EPOCHS - 1 and final["global_step"] == EPOCHS * per_epoch
    history = final["callbacks"]["EpochHistory"]["history"]  # every epoch once, each at its exact step
    assert [(row["epoch"], row["step"]) for row in history] == [(e, (e + 1) * per_epoch) for e in range(EPOCHS)]

    uri, exp = p.tracking.uri, p.tracking.experiment
    (child,) = tracking.child_runs(uri, exp, result.parent_run_id)  # the retry went on in the same MLflow run
    assert child["run_id"] == trial.run_id and child["status"] == "FINISHED"
    # Lightning logs an epoch's validation at its last batch's step. MLflow metrics are append-only: an epoch
    # the killed attempt finished after its last registered checkpoint is logged again by the retry; the
    # epochs up to that checkpoint are not trained (nor logged) twice
    logged = [step for step, _ in tracking.metric_history(uri, trial.run_id, "val/loss")]
    assert sorted(set(logged)) == [(e + 1) * per_epoch - 1 for e in range(EPOCHS)]
    assert all(logged.count((e + 1) * per_epoch - 1) == 1 for e in range(kept))
    assert not tracking.find_runs(uri, exp, "attributes.status = 'RUNNING'")
