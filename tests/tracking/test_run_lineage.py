"""Runs worth comparing, end to end: the final training run of a committed DVC project carries MLflow's source
tags and its data as MLflow datasets with the DVC digests; a sweep trial and its sweep record what the trial
reads; the registered version has a signature and requirements pinned to the environment that trained it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.tracking.registry import SERVED_DISTRIBUTIONS, pinned_requirements
from stages import train as train_stage
from tests.conftest import params_under

MD5 = {"data/encoded": "e" * 32 + ".dir", "data/vocab": "f" * 32 + ".dir", "data/prepared/coco": "c" * 32 + ".dir"}
# what loading the served model and predicting imports, in a fresh interpreter: distribution names
IMPORTS = """
import json, sys
from importlib.metadata import packages_distributions
import mlflow.pyfunc, pandas as pd
mlflow.pyfunc.load_model(sys.argv[1]).predict(pd.DataFrame({"prompt": ["The "]}))
found = packages_distributions()
print(json.dumps(sorted({d for m in list(sys.modules) for d in found.get(m.split(".")[0], [])})))
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def norm(name: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture
def project(prepared_params, tmp_path, monkeypatch) -> Path:
    """A committed git project (cwd) whose dvc.lock lists the prepared data, linked in at the paths it names."""
    proj = tmp_path / "proj"
    for rel, real in {"data/encoded": prepared_params.paths.encoded, "data/vocab": prepared_params.paths.vocab,
                      "data/prepared/coco": prepared_params.paths.coco}.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).symlink_to(real, target_is_directory=True)
    outs = [{"path": rel, "hash": "md5", "md5": md5} for rel, md5 in MD5.items()]
    (proj / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"vocab": {"cmd": "x", "outs": outs}}}))
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", "data")
    monkeypatch.chdir(proj)
    return proj


def test_the_final_run_and_its_registered_version_are_comparable(prepared_params, project, tmp_path):
    p = params_under(prepared_params, tmp_path, **{"paths.encoded": "data/encoded", "paths.vocab": "data/vocab"})
    best = Path(p.paths.sweeps) / "lstm_lm" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"overrides": {}}))
    metrics = train_stage.run(p, "lstm_lm", best=True, register=True)

    mlflow.set_tracking_uri(p.tracking.uri)
    run = MlflowClient().get_run(metrics["run_id"])
    head = git(project, "rev-parse", "HEAD")
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git.commit"] == head
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["git.dirty"] == "false"
    assert not run.data.tags["mlflow.source.name"].startswith("/")  # ours, not Lightning's absolute argv[0]
    inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert inputs == {"data/encoded": MD5["data/encoded"], "data/vocab": MD5["data/vocab"]}  # no images for an LM

    folder = Path(tracking.fetch_model(p.tracking.uri, "lstm_lm", "champion", tmp_path / "fetched")["path"])
    signature = yaml.safe_load((folder / "MLmodel").read_text())["signature"]
    assert json.loads(signature["outputs"]) == [{"type": "string", "required": True}]
    assert json.loads(signature["inputs"]) == [{"type": "string", "name": "prompt", "required": False}]
    pins = (folder / "requirements.txt").read_text().split()
    assert set(pinned_requirements()) <= set(pins) and f"capline=={version('capline')}" in pins
    assert all(pin == f"{pin.split('==')[0]}=={version(pin.split('==')[0])}" for pin in pins)

    served = mlflow.pyfunc.load_model(str(folder))
    with pytest.raises(MlflowException) as bad:  # MLflow drops the unknown column, the model says what it wants
        served.predict(pd.DataFrame({"picture": ["x"]}))
    assert bad.value.message.startswith("no 'prompt' in the request; send e.g.")
    with pytest.raises(MlflowException) as bad:  # past the signature, each bad record is still named
        served.predict(pd.DataFrame({"prompt": ["The ", None]}))
    assert bad.value.message == "record 1: no 'prompt'"

    done = subprocess.run([sys.executable, "-c", IMPORTS, str(folder)], capture_output=True, text=True, check=True)
    imported = {norm(d) for d in json.loads(done.stdout.strip().splitlines()[-1])}
    declared = {norm(re.split(r"[\s<>=!\[;(~]", r, maxsplit=1)[0]) for r in requires("capline") or []
                if "extra ==" not in r}
    assert imported & declared <= {norm(d) for d in SERVED_DISTRIBUTIONS}, "served imports not pinned"


def test_a_trial_and_its_sweep_record_the_data_the_trial_reads(prepared_params, tmp_path, monkeypatch):
    from pipeline.tuning import trial

    # the node id is all open_child asks Ray for: one MLflow run needs no Ray cluster
    monkeypatch.setattr(trial.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    p = params_under(prepared_params, tmp_path)
    lineage = {**tracking.lineage_tags(tmp_path), f"dvc.{p.paths.encoded}": MD5["data/encoded"],
               f"dvc.{p.paths.vocab}": MD5["data/vocab"], f"dvc.{p.paths.coco}": MD5["data/prepared/coco"]}
    parent = tracking.create_run(p.tracking.uri, p.tracking.experiment, "sweep-lstm_lm", lineage)
    ctx = trial.TrialContext(
        family="lstm_lm", base=p.to_dict(), root=str(tmp_path), sweep_name="sweep-x", train_storage=str(tmp_path),
        uri=p.tracking.uri, experiment=p.tracking.experiment, parent_run_id=parent, lineage=lineage, num_workers=1,
        use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0, max_epochs=1, epoch_fraction=1.0)
    runs = [trial.open_child(ctx, trial_id, ctx.params({})) for trial_id in ("t1", "t2")]
    client = MlflowClient()
    for run_id in (*runs, parent):
        run = client.get_run(run_id)
        assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == sorted([p.paths.encoded, p.paths.vocab])
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and "mlflow.source.name" in run.data.tags
