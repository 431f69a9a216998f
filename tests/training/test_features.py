"""Frozen-encoder features: extraction (shapes, dtype, batching, atomic writes) and the manifest's checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import SPLITS
from pipeline.data.images import sha256_file
from pipeline.io import write_json
from pipeline.models.encoders import SmallCnnEncoder, build_encoder, efficientnet_weights_file
from pipeline.params import load_params
from pipeline.training.datasets import LazyArray
from pipeline.training.features import check_manifest, extract_features, read_manifest, write_manifest
from tests.conftest import ROOT

ROWS = {"train": 5, "val": 2, "test": 3}


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)  # (N, 3, S, S)


@pytest.fixture(scope="module")
def small_cnn() -> SmallCnnEncoder:
    torch.manual_seed(0)
    return SmallCnnEncoder().freeze()


@pytest.fixture(scope="module")
def effnet():
    return build_encoder("efficientnet_lite0", None, freeze=True, finetune_blocks=0)


@pytest.fixture(scope="module")
def captioner():
    """models.captioner of the real params with the frozen, pretrained encoder features need."""
    return load_params(ROOT / "params.yaml").models.captioner.model_copy(
        update={"encoder": "efficientnet_lite0", "freeze_encoder": True, "finetune_blocks": 0})


def make_coco(root: Path, size: int = 32, seed: int = 0) -> Path:
    """A prepared-COCO folder: <split>/images.npy and a manifest with their sha256, like prepare_coco's."""
    coco = root / "coco"
    for i, split in enumerate(SPLITS):
        (coco / split).mkdir(parents=True, exist_ok=True)
        np.save(coco / split / "images.npy", random_images(ROWS[split], size, seed + i))
    write_json(coco / "manifest.json", {"image_size": size, "sha256": {
        f"{s}/images.npy": sha256_file(coco / s / "images.npy") for s in SPLITS}})
    return coco


def make_features(root: Path, encoder, captioner, coco: Path, dtype: str = "float16") -> Path:
    out = root / "features"
    done = {s: extract_features(encoder, LazyArray(coco / s / "images.npy"), 2, out / f"{s}.npy", dtype)
            for s in SPLITS}
    write_manifest(out, captioner, coco, dtype, done)
    return out


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-6), ("float16", 1e-2)])
def test_extract_matches_the_encoder_batch_by_batch(tmp_path, small_cnn, dtype, rtol):
    images = random_images(7)
    np.save(tmp_path / "images.npy", images)
    stats = extract_features(small_cnn, LazyArray(tmp_path / "images.npy"), 3, tmp_path / "f.npy", dtype)
    feats = np.load(tmp_path / "f.npy")
    with torch.no_grad():
        expected = small_cnn.eval()(torch.from_numpy(images)).numpy()  # (7, 256, 2, 2)
    assert feats.dtype == np.dtype(dtype) and feats.shape == expected.shape == (7, 256, 2, 2)
    np.testing.assert_allclose(feats.astype(np.float32), expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    assert stats["rows"] == 7 and stats["shape"] == [7, 256, 2, 2] and stats["bytes"] == (tmp_path / "f.npy").stat(
    ).st_size


def test_extract_restores_the_mode_and_takes_an_ndarray(tmp_path, small_cnn):
    small_cnn.train()
    extract_features(small_cnn, random_images(2), 8, tmp_path / "f.npy", "float32")
    assert small_cnn.training and np.load(tmp_path / "f.npy").shape == (2, 256, 2, 2)


def test_an_empty_split_gives_an_empty_feature_file(tmp_path, small_cnn):
    extract_features(small_cnn, random_images(0), 4, tmp_path / "f.npy")
    assert np.load(tmp_path / "f.npy").shape == (0, 256, 2, 2)


class FailsOnSecondBatch(torch.nn.Module):
    """A stand-in encoder that dies mid-extraction (a full disk, a kill)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, images):
        self.calls += 1
        if self.calls > 2:  # call 1 probes the shape, call 2 is the first batch
            raise RuntimeError("boom")
        return self.inner(images)


def test_a_failed_extraction_leaves_the_previous_file_and_no_temporary(tmp_path, small_cnn):
    out = tmp_path / "f.npy"
    np.save(out, np.arange(3))
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(FailsOnSecondBatch(small_cnn), random_images(6), 2, out)
    assert np.array_equal(np.load(out), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]


def test_bad_images_and_dtype_are_errors_naming_them(tmp_path, small_cnn):
    np.save(tmp_path / "images.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"images.npy: expected uint8 images \(N, 3, S, S\), got float32"):
        extract_features(small_cnn, LazyArray(tmp_path / "images.npy"), 2, tmp_path / "f.npy")
    with pytest.raises(ValueError, match="dtype must be one of"):
        extract_features(small_cnn, random_images(2), 2, tmp_path / "f.npy", "bfloat16")
    assert not (tmp_path / "f.npy").exists()


def test_manifest_records_the_encoder_weights_images_and_shapes(tmp_path, effnet, captioner):
    coco = make_coco(tmp_path)
    out = make_features(tmp_path, effnet, captioner, coco)
    m = check_manifest(out, captioner, coco, "float16")
    assert m == read_manifest(out)
    assert m["encoder"] == "efficientnet_lite0" and m["image_size"] == 32 and m["dtype"] == "float16"
    assert m["weights"] == f"sha256:{sha256_file(efficientnet_weights_file())}"
    assert m["feature_shape"] == [1280, 1, 1]  # 32 px / 32
    assert {s: e["rows"] for s, e in m["splits"].items()} == ROWS
    assert m["splits"]["val"]["images"] == f"sha256:{sha256_file(coco / 'val' / 'images.npy')}"


@pytest.fixture
def checked(tmp_path, effnet, captioner):
    """A prepared folder and its valid features, for the mismatch tests."""
    coco = make_coco(tmp_path)
    return coco, make_features(tmp_path, effnet, captioner, coco)


def test_another_encoder_or_training_mode_is_refused_naming_the_field(checked, captioner):
    coco, out = checked
    with pytest.raises(ValueError, match=r"manifest.json: encoder is efficientnet_lite0, models.captioner.encoder "
                                         r"is resnet18; rerun `dvc repro features`"):
        check_manifest(out, captioner.model_copy(update={"encoder": "resnet18"}), coco)
    with pytest.raises(ValueError, match=r"freeze_encoder is True, models.captioner.freeze_encoder is False"):
        check_manifest(out, captioner.model_copy(update={"freeze_encoder": False}), coco)
    with pytest.raises(ValueError, match=r"dtype is float16, features.dtype is float32"):
        check_manifest(out, captioner, coco, "float32")


def test_other_weights_are_refused(checked, captioner, tmp_path):
    coco, out = checked
    other = tmp_path / "other.pth"
    data = efficientnet_weights_file().read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit off: other weights, same size
    with pytest.raises(ValueError, match=r"weights is sha256:[0-9a-f]{64}, the encoder's weights file is sha256:"):
        check_manifest(out, captioner.model_copy(update={"encoder_weights": str(other)}), coco)


def test_changed_images_are_refused(checked, captioner):
    coco, out = checked
    np.save(coco / "train" / "images.npy", random_images(ROWS["train"], seed=99))
    write_json(coco / "manifest.json", {"sha256": {f"{s}/images.npy": sha256_file(coco / s / "images.npy")
                                                   for s in SPLITS}})
    with pytest.raises(ValueError, match=r"splits.train.images is sha256:\w+, .*train/images.npy is sha256:"):
        check_manifest(out, captioner, coco)


def test_another_image_size_is_refused(checked, captioner):
    coco, out = checked
    for i, split in enumerate(SPLITS):
        np.save(coco / split / "images.npy", random_images(ROWS[split], 64, i))
    with pytest.raises(ValueError, match=r"image_size is 32, the image size of .*images.npy is 64"):
        check_manifest(out, captioner, coco)


def test_a_damaged_feature_file_is_refused_naming_it(checked, captioner):
    coco, out = checked
    np.save(out / "val.npy", np.zeros((1, 1280, 1, 1), dtype=np.float16))
    with pytest.raises(ValueError, match=r"val.npy: expected float16 \(2, 1280, 1, 1\) \(manifest.json\), got float16 "
                                         r"\(1, 1280, 1, 1\)"):
        check_manifest(out, captioner, coco)
    (out / "val.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"val.npy: not a readable .npy array"):
        check_manifest(out, captioner, coco)


def test_a_disabled_or_missing_manifest_says_what_to_run(checked, captioner, tmp_path):
    coco, out = checked
    write_json(out / "manifest.json", {"enabled": False})
    with pytest.raises(ValueError, match=r"enabled is false .* features.enabled is true; rerun `dvc repro features`"):
        check_manifest(out, captioner, coco)
    shutil.rmtree(out)
    with pytest.raises(FileNotFoundError, match=r"features/manifest.json: not found .*dvc repro features"):
        check_manifest(out, captioner, coco)
