"""Stage `features` and training on its output: disabled stage, params checks, same loss as on images,
`capline train captioner` on features end to end, and a checkpoint that still captions raw images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models.encoders import build_encoder
from pipeline.params import ParamsError, load_params
from pipeline.training.checkpoints import load_module
from pipeline.training.fit import build_datamodule, train, vocabulary
from stages import features as features_stage
from tests.conftest import ROOT, params_under, tiny_overrides

FROZEN = {"models.captioner.encoder": "efficientnet_lite0", "models.captioner.freeze_encoder": True,
          "models.captioner.finetune_blocks": 0}


def with_features(prepared, root: Path, dtype: str = "float16", **extra):
    """Tiny params on the session's prepared data, features enabled, writing under root."""
    return params_under(prepared, root, **FROZEN, **{"features.enabled": True, "features.dtype": dtype,
                                                     "paths.features": str(root / "features"), **extra})


@pytest.fixture(scope="module")
def extracted(prepared_params, tmp_path_factory):
    """dtype -> params whose features stage has run (once per dtype for the module)."""
    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = with_features(prepared_params, tmp_path_factory.mktemp(f"features-{dtype}"), dtype)
            features_stage.run(cache[dtype])
        return cache[dtype]

    return get


def test_disabled_stage_writes_only_the_manifest_and_never_imports_torch(tmp_path):
    overrides = tiny_overrides(tmp_path)
    (tmp_path / "data" / "features").mkdir(parents=True)
    (tmp_path / "data" / "features" / "train.npy").write_bytes(b"stale")  # from an earlier enabled run
    code = (f"import sys; from pipeline.params import load_params; from stages.features import run; "
            f"run(load_params({str(ROOT / 'params.yaml')!r}, {overrides!r})); "
            f"assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert [p.name for p in (tmp_path / "data" / "features").iterdir()] == ["manifest.json"]
    assert json.loads((tmp_path / "data" / "features" / "manifest.json").read_text()) == {"enabled": False}
    assert json.loads((tmp_path / "metrics" / "features.json").read_text()) == {"enabled": False}


@pytest.mark.parametrize("overrides,named", [
    ({"models.captioner.freeze_encoder": False}, "models.captioner.freeze_encoder: true (got false)"),
    ({"models.captioner.finetune_blocks": 2}, "models.captioner.finetune_blocks: 0 (got 2)"),
    ({"models.captioner.encoder": "small_cnn"}, "pretrained models.captioner.encoder (got small_cnn"),
    ({"sweep.captioner.space": {"models.captioner.encoder": {"choice": ["resnet18", "efficientnet_lite0"]}}},
     "no encoder keys in sweep.captioner.space (got models.captioner.encoder)"),
])
def test_enabled_features_need_a_fixed_pretrained_encoder(tmp_path, overrides, named):
    sets = {**tiny_overrides(tmp_path), **FROZEN, "features.enabled": True}
    assert load_params(ROOT / "params.yaml", sets).features.enabled
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", {**sets, **overrides})
    assert "features.enabled: true needs" in str(err.value) and named in str(err.value)


def test_stage_writes_features_equal_to_the_encoder_on_the_images(extracted):
    p = extracted("float32")
    metrics = json.loads((Path(p.paths.metrics) / "features.json").read_text())
    assert metrics["enabled"] and metrics["encoder"] == "efficientnet_lite0"
    assert metrics["feature_shape"] == [1280, 1, 1] and metrics["dtype"] == "float32"  # 32 px / 32
    dm = build_datamodule(p, "captioner", vocabulary(p, "captioner"))  # checks the manifest first
    encoder = build_encoder("efficientnet_lite0", None, True, 0).eval()
    for split in ("train", "test"):
        images = np.load(Path(p.paths.coco) / split / "images.npy")
        with torch.no_grad():
            expected = encoder(torch.from_numpy(images)).numpy()  # (N, 1280, 1, 1)
        np.testing.assert_allclose(np.load(Path(p.paths.features) / f"{split}.npy"), expected, rtol=1e-5, atol=1e-5)
        assert metrics["splits"][split] == len(images)
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].dtype == torch.uint8 and batch["features"].shape[1:] == (1280, 1, 1)
    train_batch = next(iter(dm.train_dataloader()))
    assert "images" not in train_batch and train_batch["features"].dtype == torch.float32


class StepRecorder(pl.Callback):
    """The memory each training step starts from (what the decoder sees of the images) and its loss."""

    def __init__(self) -> None:
        self.memories: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():  # the frozen encoder draws no random numbers: the run itself is unchanged
            self.memories.append(pl_module.encode_batch(batch).clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def first_steps(p, steps: int = 3) -> StepRecorder:
    """The first optimiser steps of `capline train captioner` (no validation, no early stopping)."""
    recorder = StepRecorder()
    train(p, "captioner", logger=False, callbacks=[recorder], max_steps=steps, limit_val_batches=0,
          enable_progress_bar=False)
    return recorder


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-3), ("float16", 2e-2)])
def test_training_on_features_gives_the_loss_of_training_on_images(extracted, tmp_path, dtype, rtol):
    p = extracted(dtype)
    # cross-entropy only: with one region per image (32 px) the attention term is a large constant
    same = {**FROZEN, "train.captioner.early_stopping_patience": 0, "models.captioner.attention_reg": 0.0}
    on_images = first_steps(params_under(p, tmp_path / "images", **same))
    on_features = first_steps(params_under(p, tmp_path / "features", **same, **{
        "features.enabled": True, "features.dtype": dtype, "paths.features": p.paths.features}))
    assert len(on_images.losses) == len(on_features.losses) == 3
    for a, b in zip(on_images.memories, on_features.memories, strict=True):  # the same images, row for row
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * float(a.abs().max()))
    # float16 storage rounds each feature by up to ~5e-4 relative; 2e-2 is the stated bound for it
    np.testing.assert_allclose(on_features.losses, on_images.losses, rtol=rtol)


def test_capline_train_on_features_then_caption_raw_images(extracted, prepared_params, tmp_path):
    p = params_under(extracted("float16"), tmp_path, **FROZEN, **{
        "features.enabled": True, "paths.features": extracted("float16").paths.features})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.to_dict(), sort_keys=False))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "captioner", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    checkpoint = Path(p.paths.models) / "captioner" / "best.ckpt"
    assert f"checkpoint: {checkpoint}" in result.output

    jpg = sorted((Path(prepared_params.paths.sample) / "images").glob("*.jpg"))[0]
    result = runner.invoke(app, ["caption", str(jpg), "--params", str(params_file), "--beam", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{jpg}: ") and len(result.output.split(": ", 1)[1].split()) >= 1

    module = load_module("captioner", checkpoint)  # the frozen encoder's weights travel in the checkpoint
    images = torch.from_numpy(np.load(Path(p.paths.coco) / "test" / "images.npy"))
    feats = torch.from_numpy(np.load(Path(p.paths.features) / "test.npy"))
    with torch.no_grad():
        from_images, from_features = module.model.encode(images), module.model.encode_features(feats.float())
    torch.testing.assert_close(from_features, from_images, rtol=2e-2, atol=2e-2)


def test_a_sweep_trial_reads_the_features_at_an_absolute_path(tmp_path):
    from pipeline.tuning.trial import TrialContext

    base = load_params(ROOT / "params.yaml", {**FROZEN, "features.enabled": True}).to_dict()
    assert base["paths"]["features"] == "data/features"  # relative in params.yaml
    ctx = TrialContext(family="captioner", base=base, root=str(tmp_path), sweep_name="s", train_storage="t",
                       uri="sqlite:///m.db", experiment="e", parent_run_id="r", lineage={}, num_workers=1,
                       use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0, max_epochs=1, epoch_fraction=1.0)
    p = ctx.runtime(ctx.params({"train.captioner.lr": 1e-3}))  # what train_trial hands build_datamodule
    assert p.features.enabled and p.paths.features == str((tmp_path / "data" / "features").resolve())
