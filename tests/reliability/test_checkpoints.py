"""Damaged checkpoints: a truncated last.ckpt is detected, the previous good one is resumed from, with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from pipeline.training.checkpoints import checkpoint_path, checkpoint_step, load_module
from pipeline.training.fit import train
from tests.conftest import params_under

FAMILY = "lstm_lm"


class OnlyTheFirstEpochIsBest(pl.Callback):
    """Report the epoch number as the validation loss, so best.ckpt stays at epoch 0 while last.ckpt moves on."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics["val/loss"] = torch.tensor(float(trainer.current_epoch))


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a kill during a copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def two_epochs(prepared_params, tmp_path):
    """Params for the tiny LM, trained 2 epochs: best.ckpt is epoch 0, last.ckpt epoch 1."""
    def params(epochs: int):
        return params_under(prepared_params, tmp_path, **{f"train.{FAMILY}.max_epochs": epochs,
                                                          f"train.{FAMILY}.early_stopping_patience": 0})

    first = train(params(2), FAMILY, logger=False, callbacks=[OnlyTheFirstEpochIsBest()])
    return params, first


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_good_one(two_epochs, caplog):
    params, first = two_epochs
    per_epoch = first.steps // 2
    last, best = checkpoint_path(params(2), FAMILY, "last"), checkpoint_path(params(2), FAMILY, "best")
    assert checkpoint_step(best) == per_epoch and checkpoint_step(last) == 2 * per_epoch
    truncate(last)

    with caplog.at_level(logging.WARNING, logger="pipeline.training.fit"):
        resumed = train(params(3), FAMILY, resume=True, logger=False, callbacks=[OnlyTheFirstEpochIsBest()])

    assert f"{last}: not a readable checkpoint" in caplog.text
    assert f"resuming {FAMILY} from {best} (step {per_epoch})" in caplog.text
    # continued from epoch 0's state: epochs 1 and 2 trained again, every step exactly once
    assert resumed.steps == 3 * per_epoch
    assert [row["epoch"] for row in resumed.history] == [0.0, 1.0, 2.0]
    assert [row["step"] for row in resumed.history] == [per_epoch, 2.0 * per_epoch, 3.0 * per_epoch]
    assert checkpoint_step(last) == 3 * per_epoch  # rewritten whole


def test_with_no_readable_checkpoint_resume_stops_before_training_naming_every_file(two_epochs):
    params, _ = two_epochs
    paths = [checkpoint_path(params(2), FAMILY, which) for which in ("last", "best")]
    for path in paths:
        truncate(path)
    sizes = [path.stat().st_size for path in paths]
    with pytest.raises(ValueError, match="train without --resume to start over") as info:
        train(params(3), FAMILY, resume=True, logger=False)
    assert all(f"{path}: not a readable checkpoint" in str(info.value) for path in paths)
    assert [path.stat().st_size for path in paths] == sizes  # nothing trained, nothing overwritten


def test_an_explicit_damaged_checkpoint_and_loading_one_name_the_file(two_epochs, tmp_path):
    params, first = two_epochs
    broken = tmp_path / "copy.ckpt"
    broken.write_bytes(Path(first.best_checkpoint).read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{broken}: not a readable checkpoint"):
        train(params(3), FAMILY, resume=broken, logger=False)
    with pytest.raises(ValueError, match=f"{broken}: not a readable checkpoint"):
        load_module(FAMILY, broken)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)  # loadable, but not a Lightning checkpoint
    with pytest.raises(ValueError, match=f"{foreign}: not a Lightning checkpoint"):
        load_module(FAMILY, foreign)
