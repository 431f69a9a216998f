"""MLflow tracking against a real SQLite store in a temporary folder (one store for the module)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from pipeline import tracking

EXPERIMENT = "capline-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A SQLite store in a folder that does not exist yet; cwd moved to a scratch folder to catch ./mlruns."""
    base = tmp_path_factory.mktemp("tracking")
    scratch = base / "cwd"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(scratch)
        yield {"uri": f"sqlite:///{base / 'stores' / 'a' / 'mlflow.db'}", "base": base, "cwd": scratch}
    while mlflow.active_run() is not None:  # never leak an active run into other modules
        mlflow.end_run("KILLED")


@pytest.fixture
def run_id(store) -> str:
    """A fresh run of the test experiment, ended after the test."""
    run_id = tracking.create_run(store["uri"], EXPERIMENT, run_name="t")
    yield run_id
    tracking.end_run("FINISHED", run_id)


def test_configure_creates_folder_and_is_idempotent(store) -> None:
    exp_id = tracking.configure(store["uri"], EXPERIMENT)
    db = store["base"] / "stores" / "a" / "mlflow.db"
    assert db.is_file()
    assert tracking.configure(store["uri"], EXPERIMENT) == exp_id
    exp = MlflowClient().get_experiment(exp_id)
    assert exp.name == EXPERIMENT
    assert exp.artifact_location == (db.parent / "mlartifacts").as_uri()


@pytest.mark.parametrize("uri", ["mlruns", "./mlruns", "file:///tmp/mlruns"])
def test_configure_refuses_file_stores(uri: str) -> None:
    with pytest.raises(ValueError, match="file stores"):
        tracking.configure(uri, EXPERIMENT)


def test_params_are_logged_flat_and_read_back(store, run_id: str) -> None:
    params = {"models": {"captioner": {"arch": "show_tell", "dropout": 0.2, "pretrained": None}},
              "evaluate": {"temperatures": [0.5, 1.0], "meteor": True},
              "long": "x" * 7000, "odd key!": 3}
    logged = tracking.log_params_flat(run_id, params)
    got = MlflowClient().get_run(run_id).data.params
    assert got == logged
    assert got["models.captioner.arch"] == "show_tell"
    assert got["models.captioner.dropout"] == "0.2"
    assert got["models.captioner.pretrained"] == "null"
    assert got["evaluate.temperatures"] == "[0.5, 1.0]"
    assert got["evaluate.meteor"] == "true"
    assert len(got["long"]) == tracking.MAX_PARAM_VALUE and got["long"].endswith("...")
    assert got["odd key_"] == "3"


def test_params_on_the_active_run(store) -> None:
    tracking.configure(store["uri"], EXPERIMENT)
    with mlflow.start_run() as run:
        tracking.log_params_flat(None, {"a": {"b": 1}})
    assert MlflowClient().get_run(run.info.run_id).data.params == {"a.b": "1"}
    with pytest.raises(ValueError, match="no active MLflow run"):
        tracking.log_params_flat(None, {"a": 1})


def test_metrics_with_steps(store, run_id: str) -> None:
    for step in range(3):
        logged = tracking.log_metrics(run_id, {"val": {"loss": 2.0 - step, "bleu_4": np.float32(0.25)},
                                               "meteor": None, "meteor_error": "no java"}, step=step)
    assert logged == {"val.loss": 0.0, "val.bleu_4": 0.25}
    history = MlflowClient().get_metric_history(run_id, "val.loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert set(MlflowClient().get_run(run_id).data.metrics) == {"val.loss", "val.bleu_4"}


def test_artifacts_upload_and_download(store, run_id: str, tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text("hello", encoding="utf-8")
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "a.json").write_text("{}", encoding="utf-8")
    tracking.log_artifact(run_id, report, "reports")
    tracking.log_artifact(run_id, folder, "samples")
    back = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reports/report.txt",
                                                    dst_path=str(tmp_path / "down")))
    assert back.read_text(encoding="utf-8") == "hello"
    assert [f.path for f in MlflowClient().list_artifacts(run_id, "samples")] == ["samples/a.json"]
    assert list((store["base"] / "stores" / "a" / "mlartifacts").rglob("report.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tracking.log_artifact(run_id, tmp_path / "missing.txt")


class TinyModule(pl.LightningModule):
    """Two parameters fitted to a constant: enough for a real training loop."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.ones(8, 1))
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_lightning_logger_logs_and_finishes(store, tmp_path: Path) -> None:
    logger = tracking.lightning_logger(store["uri"], EXPERIMENT, "lightning", {"family": "tiny"})
    trainer = pl.Trainer(max_steps=2, logger=logger, accelerator="cpu", enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
                         default_root_dir=tmp_path)
    trainer.fit(TinyModule())
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lightning"
    assert run.data.tags["family"] == "tiny"
    assert run.data.tags[tracking.PID_TAG].isdigit()
    assert len(MlflowClient().get_metric_history(logger.run_id, "train_loss")) == 2


def test_lightning_logger_attaches_to_an_existing_run(store, tmp_path: Path) -> None:
    parent = tracking.create_run(store["uri"], EXPERIMENT, "outer")
    tracking.end_run("FINISHED", parent)
    logger = tracking.lightning_logger(store["uri"], EXPERIMENT, "ignored", {"stage": "again"}, run_id=parent)
    logger.log_metrics({"x": 1.5}, step=4)
    logger.finalize("success")
    run = MlflowClient().get_run(parent)
    assert run.data.metrics["x"] == 1.5 and run.data.tags["stage"] == "again"


def test_a_logging_only_logger_leaves_the_runs_status_to_its_owner(store) -> None:
    run_id = tracking.create_run(store["uri"], EXPERIMENT, "trial")  # RUNNING, owned by a sweep's trainable
    logger = tracking.lightning_logger(store["uri"], EXPERIMENT, "ignored", {}, run_id=run_id, ends_run=False)
    logger.log_metrics({"x": 2.0}, step=1)
    logger.finalize("failed")  # a killed DDP attempt's surviving worker on its way out
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.metrics["x"] == 2.0


def test_nested_runs_and_statuses(store) -> None:
    parent = tracking.create_run(store["uri"], EXPERIMENT, "sweep")
    child = tracking.create_run(store["uri"], EXPERIMENT, "trial", {"trial": 0}, parent_run_id=parent)
    failed = tracking.create_run(store["uri"], EXPERIMENT, "bad", parent_run_id=parent)
    tracking.end_run("FINISHED", child)
    tracking.end_run("FAILED", failed)
    tracking.end_run("FINISHED", parent)
    client = MlflowClient()
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(child).data.tags["trial"] == "0"
    assert client.get_run(child).info.status == "FINISHED"
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"
    assert mlflow.active_run() is None  # none of them became this process's active run


def test_end_run_by_id_and_bad_status(store) -> None:
    run_id = tracking.create_run(store["uri"], EXPERIMENT, "manual")
    tracking.end_run("KILLED", run_id)
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert mlflow.active_run() is None
    with pytest.raises(ValueError, match="FINISHED"):
        tracking.end_run("DONE")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


def test_lineage_tags_in_a_git_repo_with_dvc_lock(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  sample:\n    cmd: python -m stages.sample\n    outs:\n"
        "    - path: data/sample\n      hash: md5\n      md5: abc123.dir\n"
        "    - path: metrics/sample.json\n      md5: def456\n  vocab:\n    cmd: x\n", encoding="utf-8")
    git(repo, "init", "-q")
    git(repo, "add", "dvc.lock")
    git(repo, "commit", "-q", "-m", "init")
    tags = tracking.lineage_tags(repo)
    head = git(repo, "log", "-1", "--format=%H")
    assert tags == {"git.commit": head, "git.dirty": "false", "mlflow.source.git.commit": head,
                    "mlflow.source.name": tags["mlflow.source.name"], "mlflow.source.type": "LOCAL",
                    "dvc.data/sample": "abc123.dir", "dvc.metrics/sample.json": "def456"}
    (repo / "new.py").write_text("x = 1\n", encoding="utf-8")
    assert tracking.lineage_tags(repo)["git.dirty"] == "true"


def test_lineage_tags_outside_git_and_bad_lock(tmp_path: Path) -> None:
    tags = tracking.lineage_tags(tmp_path)
    assert {k: v for k, v in tags.items() if k.startswith("git.")} == {"git.commit": "unknown", "git.dirty": "unknown"}
    assert not [k for k in tags if k.startswith("dvc.")]
    (tmp_path / "dvc.lock").write_text("stages:\n  s:\n    outs:\n    - path: a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dvc.lock: stages.s.outs\[0\]: expected 'path' and 'md5'"):
        tracking.lineage_tags(tmp_path)


def test_params_hash() -> None:
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    h = tracking.params_hash(a)
    assert len(h) == 12 and int(h, 16) >= 0
    assert tracking.params_hash({"y": {"a": "s", "b": [1, 2]}, "x": 1}) == h
    assert tracking.params_hash({"x": 2, "y": {"b": [1, 2], "a": "s"}}) != h
    with pytest.raises(ValueError, match="plain JSON"):
        tracking.params_hash({"x": object()})


def test_mark_stale_runs(store) -> None:
    client = MlflowClient()
    exp_id = tracking.configure(store["uri"], EXPERIMENT)
    proc = subprocess.Popen(["true"])  # its pid is free once it has been reaped
    proc.wait()
    dead_pid = str(proc.pid)
    orphan = client.create_run(exp_id).info.run_id  # RUNNING, no owner recorded
    crashed = client.create_run(exp_id, tags={tracking.HOST_TAG: socket.gethostname(),
                                              tracking.PID_TAG: dead_pid}).info.run_id
    remote = client.create_run(exp_id, tags={tracking.HOST_TAG: "elsewhere.invalid",
                                             tracking.PID_TAG: "1"}).info.run_id
    alive = tracking.create_run(store["uri"], EXPERIMENT, "alive")  # this process's: host and pid recorded
    stale = tracking.mark_stale_runs(store["uri"], EXPERIMENT)
    assert set(stale) >= {orphan, crashed}
    assert alive not in stale and remote not in stale
    assert client.get_run(alive).info.status == "RUNNING"
    tracking.end_run("FINISHED", alive)
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(crashed).info.status == "KILLED"
    assert client.get_run(remote).info.status == "RUNNING"
    client.set_terminated(remote, "FINISHED")


def test_no_mlruns_anywhere(store) -> None:
    # Runs last in the module: nothing above may have created a file store or its default folder.
    assert not (store["cwd"] / "mlruns").exists()
    assert not list(store["base"].rglob("mlruns"))
    assert not (store["cwd"] / "lightning_logs").exists()
