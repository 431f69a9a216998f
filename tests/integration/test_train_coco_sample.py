"""Integration: a short captioner run on the real COCO sample with the pretrained, frozen EfficientNet."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from pipeline.params import load_params
from pipeline.training.checkpoints import load_module
from pipeline.training.fit import train
from stages import prepare_coco, prepare_text, vocab
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.shared_data


class EpochLosses(pl.Callback):
    def __init__(self) -> None:
        self.val: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val/loss"]))


def test_pretrained_encoder_captioner_learns_on_real_photos(shared_data, tmp_path):
    coco = shared_data / "coco-sample"
    p = load_params(ROOT / "params.yaml", {
        **tiny_overrides(tmp_path),
        "data.coco.annotations": str(coco / "annotations" / "captions.json"),
        "data.coco.images": str(coco / "images"),
        "prepare_coco.image_size": 128, "prepare_coco.split.val": 20, "prepare_coco.split.test": 20,
        "vocab.sources": ["captions"], "vocab.min_freq": 2,
        "models.captioner.encoder": "efficientnet_lite0", "models.captioner.freeze_encoder": True,
        "models.captioner.arch": "show_attend_tell",
        "train.captioner.max_epochs": 3, "train.captioner.batch_size": 32, "train.captioner.lr": 3.0e-3,
        "train.captioner.scheduled_sampling": [0.0, 0.0],
    })
    for stage in (prepare_coco, prepare_text, vocab):
        stage.run(p)
    losses = EpochLosses()
    result = train(p, "captioner", logger=False, callbacks=[losses])
    assert len(losses.val) == 3 and losses.val[-1] < losses.val[0]
    module = load_module("captioner", result.best_checkpoint)
    assert not any(param.requires_grad for param in module.model.encoder.parameters())
    assert module.hparams["image_size"] == 128
