"""Stages train@ (with the sweep's best config) and evaluate@ (metrics and the learning-curve plot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import tracking
from pipeline.params import ParamsError
from stages import evaluate as evaluate_stage
from stages import train as train_stage
from tests.conftest import params_under


def params_in(prepared_params, tmp_path: Path):
    return params_under(prepared_params, tmp_path, **{"train.lstm_lm.max_epochs": 2,
                                                       "paths.evaluation": str(tmp_path / "evaluation")})


def write_best(p, family: str, overrides) -> Path:
    path = Path(p.paths.sweeps) / family / "best.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"family": family, "overrides": overrides}))
    return path


def test_train_applies_the_sweeps_best_config_and_evaluate_plots_the_curve(prepared_params, tmp_path):
    p = params_in(prepared_params, tmp_path)
    write_best(p, "lstm_lm", {"train.lstm_lm.lr": 0.0071, "models.lstm_lm.cell": "gru"})
    metrics = train_stage.run(p, "lstm_lm", best=True)
    assert metrics["overrides"] == {"train.lstm_lm.lr": 0.0071, "models.lstm_lm.cell": "gru"}
    hparams = torch.load(metrics["best_checkpoint"], weights_only=True)["hyper_parameters"]
    assert hparams["train"]["lr"] == 0.0071 and hparams["model"]["cell"] == "gru"
    assert json.loads((Path(p.paths.metrics) / "train_lstm_lm.json").read_text())["epochs"] == 2

    result = evaluate_stage.run(p, "lstm_lm")
    assert result["bits_per_char"] > 0
    samples = json.loads((tmp_path / "evaluation" / "lstm_lm" / "samples.json").read_text())  # for the report
    assert [s["temperature"] for s in samples["samples"]] == p.evaluate.temperatures
    assert all(s["text"].startswith(p.report.prompt) for s in samples["samples"])
    params = tracking.get_run(p.tracking.uri, metrics["run_id"])["params"]
    assert params["models.lstm_lm.cell"] == "gru" and params["train.lstm_lm.lr"] == "0.0071"
    assert not [k for k in params if k.startswith(("model/", "train/", "vocab", "train.captioner", "models.captioner"))]
    logged = tracking.get_run(p.tracking.uri, metrics["run_id"])["metrics"]  # beside the training curves
    assert result["run_id"] == metrics["run_id"] and logged["test/bits_per_char"] == result["bits_per_char"]
    elsewhere = tmp_path / "copy.ckpt"  # a checkpoint the train stage did not write has no run to add to
    elsewhere.write_bytes(Path(metrics["best_checkpoint"]).read_bytes())
    assert evaluate_stage.run(p, "lstm_lm", elsewhere)["run_id"] is None
    curve = (Path(p.paths.metrics) / "curve_lstm_lm.csv").read_text().splitlines()
    assert curve[0] == "epoch,step,train_loss,val_loss"
    assert [row.split(",")[0] for row in curve[1:]] == ["0", "1"]


def test_best_config_is_validated_like_any_override(prepared_params, tmp_path):
    p = params_in(prepared_params, tmp_path)
    path = write_best(p, "lstm_lm", {"train.lstm_lm.lr": -1.0})
    with pytest.raises(ParamsError, match=rf"{path}: train.lstm_lm.lr: Input should be greater than 0"):
        train_stage.run(p, "lstm_lm", best=True)
    write_best(p, "lstm_lm", ["not", "a", "mapping"])
    with pytest.raises(ValueError, match="field 'overrides' must be an object"):
        train_stage.run(p, "lstm_lm", best=True)


def test_train_without_a_sweep_says_what_to_run(prepared_params, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"best.json: no sweep result \(run: dvc repro sweep@captioner"):
        train_stage.run(params_in(prepared_params, tmp_path), "captioner", best=True)
