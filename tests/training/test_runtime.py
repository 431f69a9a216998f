"""runtime.threads is honoured by the commands that compute; training prints a line per epoch into logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.params import apply_overrides
from pipeline.runtime import set_threads, usable_cores
from tests.conftest import ROOT, overrides_under, params_under


def test_no_thread_count_means_every_usable_core():
    assert set_threads(None) == usable_cores() == torch.get_num_threads()
    assert set_threads(1) == 1 == torch.get_num_threads()


def test_the_train_stage_sets_the_threads_params_ask_for(prepared_params, tmp_path):
    from stages.train import run

    torch.set_num_threads(3)
    run(params_under(prepared_params, tmp_path, **{"runtime.threads": 1}), "lstm_lm")
    assert torch.get_num_threads() == 1


def test_training_under_a_pipe_prints_one_plain_line_per_epoch(prepared_params, tmp_path):
    """As under `dvc repro` or `> log`: each epoch's line arrives while training runs, not at the end."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = {**overrides_under(prepared_params, tmp_path), "train.lstm_lm.max_epochs": 2,
                 "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, overrides)))
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", "lstm_lm"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # arrives before the process ends: the line is flushed, not buffered
    still_running = proc.poll() is None
    rest, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    epochs = [line for line in [first, *rest.splitlines()] if line.startswith("train lstm_lm: epoch")]
    assert [line.split()[3] for line in epochs] == ["1/2", "2/2"], first + rest
    assert all("train/loss" in line and "val/loss" in line and line.rstrip().endswith(" s") for line in epochs)
    assert still_running and first.startswith("train lstm_lm: epoch 1/2")
    assert "\r" not in rest + err  # no progress bar redrawn into the log
    assert Path(tmp_path / "metrics/train_lstm_lm.json").is_file()
