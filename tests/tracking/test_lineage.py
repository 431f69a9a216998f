"""What makes runs comparable in MLflow: dirtiness that ignores what DVC writes (a real git repo with a real DVC
project), MLflow's source tags, the DVC data a run reads as MLflow datasets, a store refused once moved."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.tracking.lineage import git_dirty

EXPERIMENT = "capline-lineage"
DVC_YAML = """\
stages:
  make:
    foreach: [a, b]
    do:
      cmd: echo ${item}
      outs: ["${paths.data}/${item}"]
      metrics: [{"${paths.metrics}/make_${item}.json": {cache: false}}]
      plots: [{"${paths.metrics}/curve_${item}.csv": {cache: false}}]
plots:
  - summary:
      x: epoch
      y: {reports/summary.csv: [loss]}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DVC project in the subfolder proj/ of a git repo (dvc init --subdir), everything committed."""
    repo, proj = tmp_path / "repo", tmp_path / "repo" / "proj"
    proj.mkdir(parents=True)
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--subdir"], cwd=proj, check=True)
    write(proj / "params.yaml", "paths: {data: data/out, metrics: metrics}\n")
    write(proj / "dvc.yaml", DVC_YAML)
    write(proj / "dvc.lock", "schema: '2.0'\nstages: {}\n")
    write(proj / "code.py", "x = 1\n")
    write(proj / "metrics" / "make_a.json", "{}\n")
    write(proj / "reports" / "summary.csv", "epoch,loss\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    return proj


def test_dirtiness_ignores_what_dvc_writes_and_nothing_else(project: Path) -> None:
    assert git_dirty(project) == "false"
    write(project / "dvc.lock", "schema: '2.0'\nstages:\n  make@a: {cmd: echo a}\n")  # rewritten by every repro
    write(project / "metrics" / "make_a.json", '{"loss": 1}\n')  # a stage's metrics (templated path)
    write(project / "metrics" / "make_b.json", "{}\n")  # a foreach item's, not yet tracked
    write(project / "metrics" / "curve_b.csv", "epoch\n")  # a stage's plot
    write(project / "reports" / "summary.csv", "epoch,loss\n1,2\n")  # a top-level plot's data
    write(project / "data" / "out" / "a" / "part.bin", "x")  # inside a cached output
    assert git(project, "status", "--porcelain")  # changed, but only where DVC writes
    assert tracking.lineage_tags(project)["git.dirty"] == "false"
    write(project / "metrics" / "notes.txt", "mine\n")  # beside DVC's outputs, not one of them
    assert git_dirty(project) == "true"
    (project / "metrics" / "notes.txt").unlink()
    write(project / "code.py", "x = 2\n")
    assert git_dirty(project) == "true"


def test_a_dvc_yaml_dvc_cannot_read_ignores_nothing(project: Path, caplog) -> None:
    write(project / "metrics" / "make_a.json", '{"loss": 1}\n')
    assert git_dirty(project) == "false"
    write(project / "dvc.yaml", DVC_YAML.replace("${paths.data}", "${paths.nowhere}"))
    git(project, "commit", "-q", "-am", "a broken template")
    write(project / "metrics" / "make_a.json", '{"loss": 2}\n')
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.lineage"):
        assert git_dirty(project) == "true"
    assert "cannot read DVC's outputs" in caplog.text


def test_mlflow_source_tags_name_the_script_and_its_commit(project: Path) -> None:
    write(project / "stages" / "train.py", "import json, sys\nfrom pipeline.tracking import lineage_tags\n"
                                           "print(json.dumps(lineage_tags(sys.argv[1])))\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "script")
    done = subprocess.run([sys.executable, "stages/train.py", str(project)], cwd=project, check=True,
                          capture_output=True, text=True)
    tags = json.loads(done.stdout.strip().splitlines()[-1])
    head = git(project, "rev-parse", "HEAD")
    assert tags["mlflow.source.name"] == "stages/train.py"  # the script's path in the project, not absolute
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] == head
    assert tags["git.dirty"] == "false"


def test_outside_git_there_is_no_source_commit(tmp_path: Path) -> None:
    tags = tracking.lineage_tags(tmp_path)
    assert "mlflow.source.git.commit" not in tags and tags["git.commit"] == "unknown"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]


LINEAGE = {"dvc.data/prepared/coco": "a" * 32 + ".dir", "dvc.data/vocab": "b" * 32 + ".dir",
           "dvc.metrics/vocab.json": "c" * 32, "mlflow.source.git.commit": "1234abcd", "git.dirty": "false"}


def test_the_data_a_run_reads_are_its_mlflow_datasets(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.create_run(uri, EXPERIMENT, "first")
    second = tracking.create_run(uri, EXPERIMENT, "second")
    roots = ["data/prepared/coco", "data/vocab/"]
    assert tracking.log_data_inputs(first, LINEAGE, roots) == ["data/prepared/coco", "data/vocab"]
    tracking.log_data_inputs(first, LINEAGE, roots)  # a retried trial logs them again: kept once
    tracking.log_data_inputs(second, LINEAGE, ["data/vocab"])
    inputs = MlflowClient().get_run(first).inputs.dataset_inputs
    assert sorted((i.dataset.name, i.dataset.digest, i.dataset.source_type) for i in inputs) == [
        ("data/prepared/coco", "a" * 32 + ".dir", "dvc"), ("data/vocab", "b" * 32 + ".dir", "dvc")]
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    source = mlflow.data.get_source(inputs[0])
    assert isinstance(source, tracking.DvcSource) and source.commit == "1234abcd"
    assert source.load() == inputs[0].dataset.name
    assert [i.dataset.name for i in MlflowClient().get_run(second).inputs.dataset_inputs] == ["data/vocab"]
    assert tracking.log_data_inputs(second, LINEAGE, ["data/features"]) == []  # not a DVC output here


def test_a_moved_or_copied_store_is_refused_naming_both_folders(tmp_path: Path) -> None:
    made = tmp_path / "made"
    uri = f"sqlite:///{made / 'mlflow.db'}"
    run_id = tracking.create_run(uri, EXPERIMENT, "r")
    tracking.log_dict(run_id, {"a": 1}, "a.json")
    tracking.end_run("FINISHED", run_id)
    shutil.copytree(made, tmp_path / "copy")
    with pytest.raises(ValueError) as copied:
        tracking.configure(f"sqlite:///{tmp_path / 'copy' / 'mlflow.db'}", EXPERIMENT)
    message = str(copied.value)
    assert f"keeps artifacts in {made / 'mlartifacts'}, not in {tmp_path / 'copy' / 'mlartifacts'}" in message
    assert "\n" not in message
    assert tracking.load_artifact_dict(uri, run_id, "a.json") == {"a": 1}  # the original is not concerned
    made.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"mlflow.db was moved or copied: its experiment 'capline-lineage'"):
        tracking.get_run(f"sqlite:///{tmp_path / 'moved' / 'mlflow.db'}", run_id)
