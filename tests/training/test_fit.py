"""Training each family end to end on tiny data; exact resume; the non-finite guard; checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from pipeline.families import FAMILIES
from pipeline.training.callbacks import NonFiniteLossError
from pipeline.training.checkpoints import load_module
from pipeline.training.fit import train, vocabulary
from tests.conftest import params_under


class LossRecorder(pl.Callback):
    """Training loss of every optimizer step, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class SimulatedCrash(RuntimeError):
    """Stands for a killed process (Lightning swallows KeyboardInterrupt, so not that)."""


class Crash(pl.Callback):
    """Simulate a killed process after `step` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash after step {self.step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_train_writes_a_checkpoint_that_loads_weights_only(family, prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path)
    result = train(p, family, logger=False)
    assert Path(result.best_checkpoint).is_file() and Path(result.last_checkpoint).is_file()
    assert result.steps > 0 and result.epochs == 1
    assert result.best_score == result.best_score  # not NaN: the monitored metric was logged
    module = load_module(family, result.best_checkpoint)  # torch.load(weights_only=True) inside
    assert not module.training
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "callbacks"} <= set(ckpt)



@pytest.mark.parametrize(("family", "width_key"), [("captioner", "embed_size"), ("transformer_lm", "d_model")])
def test_a_model_trained_from_pretrained_vectors_loads_with_its_own_trained_ones(family, width_key, prepared_params,
                                                                                 tmp_path):
    p = params_under(prepared_params, tmp_path, **{f"models.{family}.pretrained_embeddings": True,
                                                   "paths.embeddings": str(tmp_path / "vectors"),
                                                   **({"models.transformer_lm.level": "word"}
                                                      if family != "captioner" else {})})
    width = getattr(getattr(p.models, family), width_key)
    words = len(vocabulary(p, family))
    Path(p.paths.embeddings).mkdir(parents=True)
    np.save(Path(p.paths.embeddings) / "words.npy", np.random.default_rng(0).normal(size=(words, width)))
    result = train(p, family, logger=False)
    module = load_module(family, result.best_checkpoint)  # no embeddings stage output needed to load it
    trained = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])


class WorseEveryEpoch(pl.Callback):
    """Overwrite the monitored validation loss with the epoch number: only epoch 0 is ever the best."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs before the checkpoint callbacks
        trainer.callback_metrics["val/loss"] = torch.tensor(float(trainer.current_epoch))


def test_last_checkpoint_is_the_newest_epoch_even_when_it_is_not_the_best(prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path, **{"train.lstm_lm.max_epochs": 3,
                                                   "train.lstm_lm.early_stopping_patience": 0})
    result = train(p, "lstm_lm", logger=False, callbacks=[WorseEveryEpoch()])
    last = torch.load(result.last_checkpoint, weights_only=True)
    best = torch.load(result.best_checkpoint, weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, result.steps)  # resume continues after epoch 3
    assert best["epoch"] == 0 and result.best_score == 0.0
    assert [row["epoch"] for row in last["callbacks"]["EpochHistory"]["history"]] == [0.0, 1.0, 2.0]

@pytest.mark.parametrize(("family", "overrides"), [
    ("captioner", {"models.captioner.arch": "show_attend_tell", "models.captioner.dropout": 0.3,
                   "train.captioner.scheduled_sampling": [0.2, 0.5]}),
    ("lstm_lm", {"models.lstm_lm.dropout": 0.3, "models.lstm_lm.layers": 2}),
    ("transformer_lm", {"models.transformer_lm.dropout": 0.3}),
])
def test_resume_mid_epoch_continues_exactly(family, overrides, prepared_params, tmp_path):
    epochs = {f"train.{family}.max_epochs": 2}
    full = LossRecorder()
    train(params_under(prepared_params, tmp_path / "a", **overrides, **epochs), family, logger=False,
          callbacks=[full])
    steps = len(full.losses)
    crash_at, saved_at = steps * 3 // 4, steps // 2  # second epoch, after a mid-epoch checkpoint
    p = params_under(prepared_params, tmp_path / "b", **overrides, **epochs)
    every = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=saved_at, save_top_k=-1,
                            filename="{step}")
    with pytest.raises(SimulatedCrash):
        train(p, family, logger=False, callbacks=[every, Crash(crash_at)])
    resumed = LossRecorder()
    train(p, family, logger=False, resume=tmp_path / "steps" / f"step={saved_at}.ckpt", callbacks=[resumed])
    assert len(resumed.losses) == steps - saved_at
    assert resumed.losses == pytest.approx(full.losses[saved_at:], rel=1e-6, abs=1e-7)


class PoisonWeights(pl.Callback):
    """Turn one weight into NaN after the second step (a diverged run)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_with_a_clear_message(prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at epoch 0, step 3: lower "
                                                 r"train.lstm_lm.lr"):
        train(p, "lstm_lm", logger=False, callbacks=[PoisonWeights()])


def test_unknown_family_is_rejected(prepared_params, tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        train(params_under(prepared_params, tmp_path), "gpt", logger=False)


@pytest.mark.slow
def test_compiled_model_trains_like_eager_and_checkpoints_load_uncompiled(prepared_params, tmp_path):
    eager = train(params_under(prepared_params, tmp_path / "eager"), "transformer_lm", logger=False)
    compiled = train(params_under(prepared_params, tmp_path / "compiled", **{"train.compile": True}),
                     "transformer_lm", logger=False)
    assert compiled.best_score == pytest.approx(eager.best_score, rel=1e-3)
    module = load_module("transformer_lm", compiled.best_checkpoint)  # same state_dict keys as eager
    assert type(module.model).__name__ == "TransformerLanguageModel"


def test_epoch_fraction_runs_that_share_of_the_batches(prepared_params, tmp_path):
    full = train(params_under(prepared_params, tmp_path / "full"), "lstm_lm", logger=False)
    half = train(params_under(prepared_params, tmp_path / "half", **{"train.lstm_lm.epoch_fraction": 0.5}),
                 "lstm_lm", logger=False)
    assert half.steps == int(full.steps * 0.5) and half.epochs == full.epochs == 1


@pytest.mark.parametrize(("tty", "bar", "lines"), [(True, None, False), (True, False, True), (False, None, True)])
def test_a_run_without_a_progress_bar_prints_a_line_per_epoch(tiny_params, monkeypatch, tty, bar, lines):
    """`capline reproduce` (no bar, in a terminal) and `dvc repro` (no terminal) both show each epoch."""
    from pipeline.training.callbacks import EpochLine
    from pipeline.training.fit import build_trainer

    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    overrides = {} if bar is None else {"enable_progress_bar": bar}
    trainer = build_trainer(tiny_params, "lstm_lm", **overrides)
    assert any(isinstance(cb, EpochLine) for cb in trainer.callbacks) == lines
