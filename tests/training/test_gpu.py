"""Training on a CUDA device: `precision: auto` gives bf16 autocast, losses stay finite, checkpoints load on it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from pipeline.families import FAMILIES
from pipeline.params import load_params
from pipeline.training.checkpoints import load_module
from pipeline.training.fit import train
from tests.conftest import ROOT, TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class PrecisionProbe(pl.Callback):
    """The Trainer's precision, the autocast state seen inside the model's forward, and the training losses."""

    def __init__(self) -> None:
        self.precision: str | None = None
        self.autocast: set[tuple[bool, torch.dtype]] = set()
        self.losses: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.precision = trainer.precision
        self._hook = pl_module.model.register_forward_hook(self._record)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._hook.remove()

    def _record(self, module, args, output) -> None:
        self.autocast.add((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# every model: each captioner architecture, both recurrent cells, the transformer LM
MODELS = [("captioner", {"models.captioner.arch": arch}) for arch in ("show_tell", "show_attend_tell", "transformer")]
MODELS += [("lstm_lm", {"models.lstm_lm.cell": cell}) for cell in ("lstm", "gru")] + [("transformer_lm", {})]
assert {family for family, _ in MODELS} == set(FAMILIES)


@pytest.mark.parametrize(("family", "model"), MODELS, ids=["-".join([f, *map(str, m.values())]) for f, m in MODELS])
def test_precision_auto_trains_in_bf16_on_the_gpu(family, model, prepared_params, tmp_path: Path):
    paths = {f"paths.{k}": v for k, v in prepared_params.paths.model_dump().items()}
    p = load_params(ROOT / "params.yaml", {**TINY, **paths, **model, "paths.models": str(tmp_path / "models"),
                                           "train.accelerator": "gpu", "train.precision": "auto"})
    probe = PrecisionProbe()
    result = train(p, family, logger=False, callbacks=[probe])
    assert probe.precision == "bf16-mixed"
    assert probe.autocast == {(True, torch.bfloat16)}  # every forward, training and validation, ran autocast
    assert probe.losses and all(math.isfinite(loss) for loss in probe.losses)
    module = load_module(family, result.best_checkpoint, device="cuda")
    assert all(t.is_cuda for t in module.parameters())
