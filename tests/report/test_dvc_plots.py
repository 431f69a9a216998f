"""`dvc plots show` renders the learning curves that dvc.yaml declares, from evaluate@'s CSV files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

FAMILIES = ("captioner", "lstm_lm", "transformer_lm")


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_plots_show_renders_each_models_train_and_validation_loss(trained, tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "metrics").mkdir()
    for family in FAMILIES:  # the CSVs evaluate@ wrote for the tiny trained models
        shutil.copy(Path(trained.paths.metrics) / f"curve_{family}.csv", tmp_path / "metrics")
    dvc(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "dvc", "init", "-q")
    shown = json.loads(dvc(tmp_path, "dvc", "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    (plot,) = shown["data"]["learning_curves"]
    assert plot["content"]["title"]["text"] == "Learning curves of the final models"
    drawn = {(v["filename::field"], float(v["epoch"]), float(v["dvc_inferred_y_value"]))
             for v in plot["content"]["data"]["values"]}
    expected = set()
    for family in FAMILIES:  # every epoch's train and validation loss of every final model
        with open(tmp_path / "metrics" / f"curve_{family}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                expected |= {(f"curve_{family}.csv::{y}", float(row["epoch"]), float(row[y]))
                             for y in ("train_loss", "val_loss")}
    assert drawn == expected
