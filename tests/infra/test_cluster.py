"""A sweep on a two-node Ray cluster on loopback addresses, submitted with `ray job submit` as on a real cluster;
and the team MLflow server (compose's command and settings) on its own: logins required, artifacts in S3.

Ray's storage_path is S3 (moto's server), MLflow a real server with authentication whose artifacts go to
S3. Once both trials are training, one on each node, the worker node is killed: its trial must go on from
its last checkpoint in S3 on the head node, and the sweep must finish with both trials complete.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline import tracking
from tests.conftest import params_under
from tests.infra.conftest import BIN, S3, MlflowServer, RayCluster, http_ok

pytestmark = pytest.mark.slow

FAMILY = "lstm_lm"
EPOCHS = 10
KILL_AT = EPOCHS - 2  # epochs the worker's trial has logged when its node is killed (the head redoes the rest)


def write_job_dir(prepared, root: Path) -> Path:
    """The job's working directory: a params.yaml of the session's tiny prepared data and a 2-trial sweep."""
    root.mkdir(parents=True)
    p = params_under(prepared, root, **{
        f"sweep.{FAMILY}.num_samples": 2, f"sweep.{FAMILY}.max_epochs": EPOCHS,
        f"sweep.{FAMILY}.grace_period": EPOCHS,  # ASHA stops nothing: both trials must run every epoch
        f"sweep.{FAMILY}.max_failures": 1, f"sweep.{FAMILY}.cpus_per_worker": 1,
        # ~400 small steps per epoch (seconds, not a fraction of one): both trials must still be training
        # when the later of the two trial processes has imported torch on this busy 2-core machine, or Tune
        # hands the second trial to the first one's process (actor reuse) and one node stays idle
        f"train.{FAMILY}.batch_size": 1, f"train.{FAMILY}.bptt": 16, "train.log_every_n_steps": 50,
        f"sweep.{FAMILY}.epoch_fraction": 0.5,  # fixed here: the step count above depends on it, not the default
        "paths.ray_storage": str(root / "must-not-be-used")})
    (root / "params.yaml").write_text(yaml.safe_dump(p.to_dict(), sort_keys=False), encoding="utf-8")
    return root


def trial_runs(mlflow: MlflowServer) -> list[dict]:
    return tracking.find_runs(mlflow.uri, "capline", tracking.tag_filter({"capline.kind": "trial"}))


def wait_for_both_trials(mlflow: MlflowServer, job: subprocess.Popen, log_tail: Callable[[], str], worker: str,
                         timeout: float = 240) -> list[dict]:
    """The two trial runs once the one on `worker` has logged KILL_AT epochs (checkpoints in S3), or fail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert job.poll() is None, f"the job ended before both trials were training:\n{log_tail()}"
        runs = trial_runs(mlflow)
        if len(runs) == 2 and any(r["tags"].get("node_id") == worker and len(tracking.metric_history(
                mlflow.uri, r["run_id"], "val/loss")) >= KILL_AT for r in runs):
            return runs
        if len(runs) == 2 and all(r["tags"].get("node_id") != worker for r in runs):
            return runs  # both on the head: fails the placement assertion with what happened
        time.sleep(0.3)
    raise TimeoutError(f"the worker node's trial did not reach {KILL_AT} epochs in time:\n{log_tail()}")


def result_rows(s3: S3, key: str) -> list[dict]:
    """A trial's result.json (one JSON line per report) as Tune synced it to storage."""
    return [json.loads(line) for line in s3.read(key).decode().splitlines() if line.strip()]


def run_job_losing_the_worker(cluster: RayCluster, mlflow: MlflowServer, job_dir: Path, storage: str,
                              log_path: Path) -> dict[str, str]:
    """Submit the sweep with `ray job submit`, kill the worker node mid-trial; trial id -> node it began on."""
    entrypoint = (f"cd {job_dir} && {BIN / 'capline'} sweep {FAMILY} --address auto "
                  f"--set paths.ray_storage={storage} --set tracking.uri={mlflow.uri}")
    submission = f"capline-{secrets.token_hex(4)}"
    with open(log_path, "wb") as log:
        job = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
                                "--submission-id", submission, "--", "bash", "-c", entrypoint],  # a shell for &&
                               env=cluster.client_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            runs = wait_for_both_trials(mlflow, job, lambda: log_path.read_text()[-4000:], cluster.node_id("worker"))
            placed = {r["tags"]["ray.trial_id"]: r["tags"]["node_id"] for r in runs}
            cluster.worker.stop()  # the worker node dies: raylet, its workers, the trial on it
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    status = cluster.get(f"/api/jobs/{submission}")
    assert status["status"] == "SUCCEEDED", log_path.read_text()[-4000:]
    return placed


def check_storage(s3: S3, prefix: str, placed: dict[str, str], lost: str, cluster: RayCluster) -> None:
    """Sweep state and checkpoints are in S3; the lost trial went on from a checkpoint on the head node."""
    keys = s3.keys(f"{prefix}/{FAMILY}/")
    experiment = next(k.split("/")[2] for k in keys if k.endswith("/capline_sweep.json"))
    assert any(k.startswith(f"{prefix}/{FAMILY}/{experiment}/experiment_state") for k in keys)
    for trial_id in placed:
        assert any(k.startswith(f"{prefix}/{FAMILY}/{experiment}/trial_{trial_id}/checkpoint_")
                   and k.endswith("/epoch.ckpt") for k in keys)
    rows = result_rows(s3, f"{prefix}/{FAMILY}/{experiment}/trial_{lost}/result.json")
    head = cluster.node_id("head")
    assert rows[0]["node_id"] == cluster.node_id("worker")
    restarts = [r for r in rows[1:] if r["iterations_since_restore"] == 1]
    assert restarts and restarts[0]["node_id"] == head and restarts[0]["epoch"] > 1  # not from scratch
    assert rows[-1]["epoch"] == EPOCHS and rows[-1]["node_id"] == head


def check_tracking(mlflow: MlflowServer, s3: S3, placed: dict[str, str], lost: str, head: str) -> None:
    """The sweep and both trials finished in MLflow; the best checkpoints went through the server to S3."""
    parent = tracking.latest_sweep(mlflow.uri, "capline", FAMILY)
    assert parent["status"] == "FINISHED" and parent["metrics"]["completed"] == 2
    children = tracking.child_runs(mlflow.uri, "capline", parent["run_id"])
    assert sorted(c["tags"]["ray.trial_id"] for c in children) == sorted(placed)
    artifacts = s3.keys("mlartifacts/")
    for child in children:
        assert child["status"] == "FINISHED" and child["tags"]["sweep.status"] == "completed"
        assert tracking.list_artifacts(mlflow.uri, child["run_id"], "checkpoints") == ["checkpoints/best.ckpt"]
        assert any(child["run_id"] in k and k.endswith("checkpoints/best.ckpt") for k in artifacts)
    lost_run = next(c for c in children if c["tags"]["ray.trial_id"] == lost)
    assert lost_run["tags"]["node_id"] == head  # the run follows its trial to the node it finished on


def test_a_sweep_job_uses_both_nodes_s3_and_mlflow_and_survives_losing_the_worker(
        ray_cluster: RayCluster, s3: S3, mlflow_server: MlflowServer, prepared_params, tmp_path, monkeypatch):
    for key, value in mlflow_server.env.items():  # this process reads the runs back, as a team member would
        monkeypatch.setenv(key, value)
    job_dir = write_job_dir(prepared_params, tmp_path / "job")
    prefix = f"ray-{secrets.token_hex(4)}"
    placed = run_job_losing_the_worker(ray_cluster, mlflow_server, job_dir, f"s3://{s3.bucket}/{prefix}",
                                       tmp_path / "submit.log")

    # each trial recorded the node it ran on: one on each node (1 CPU each, a trial needs 1)
    assert sorted(placed.values()) == sorted(ray_cluster.nodes), (placed, ray_cluster.nodes)
    lost = next(t for t, node in placed.items() if node == ray_cluster.node_id("worker"))
    metrics = json.loads((job_dir / "metrics" / f"sweep_{FAMILY}.json").read_text())
    assert metrics["trials"] == 2 and metrics["completed"] == 2 and metrics["errored"] == 0
    assert not (job_dir / "must-not-be-used").exists()  # Ray's storage really was S3
    check_storage(s3, prefix, placed, lost, ray_cluster)
    check_tracking(mlflow_server, s3, placed, lost, ray_cluster.node_id("head"))


# ---- the MLflow server alone -------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_server_refuses_anonymous_and_wrong_logins(mlflow_server: MlflowServer) -> None:
    api = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    assert http_ok(api) == 401
    assert http_ok(api, basic(mlflow_server.username, mlflow_server.password + "x")) == 401
    assert http_ok(api, basic(mlflow_server.username, mlflow_server.password)) == 200


def test_artifacts_logged_through_the_server_land_in_the_s3_bucket(mlflow_server: MlflowServer, s3: S3, tmp_path,
                                                                   monkeypatch) -> None:
    for key, value in mlflow_server.env.items():
        monkeypatch.setenv(key, value)
    run_id = tracking.create_run(mlflow_server.uri, "infra-probe", "probe")
    token = secrets.token_hex(8)
    (tmp_path / "probe.txt").write_text(token)
    tracking.log_artifact(run_id, tmp_path / "probe.txt", "probe")
    tracking.end_run("FINISHED", run_id)

    (key,) = [k for k in s3.keys("mlartifacts/") if run_id in k and k.endswith("probe/probe.txt")]
    assert s3.read(key).decode() == token
    assert tracking.list_artifacts(mlflow_server.uri, run_id, "probe") == ["probe/probe.txt"]
