"""Frozen-encoder features: a captioner's CNN run once over each prepared split, and the manifest that ties
the feature files to the encoder, its weights and the images they came from.

A feature file is only valid for an encoder that never changes during training (frozen, no fine-tuned
blocks, pretrained weights) and for exactly the images it was computed from; `check_manifest` refuses
anything else, naming the field, before a single training step runs on stale features.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import SPLITS
from pipeline.data.images import sha256_file
from pipeline.io import atomic_path, read_json, write_json
from pipeline.models.encoders import ImageEncoder, pretrained_weights_file
from pipeline.params import CaptionerParams

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
RERUN = "rerun `dvc repro features`"


def _uint8_images(images: Any, name: str) -> np.ndarray:
    """The (N, 3, S, S) uint8 array behind a LazyArray or an ndarray; ValueError naming it otherwise."""
    arr = images.array if hasattr(images, "array") else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"{name}: expected uint8 images (N, 3, S, S), got {arr.dtype} {tuple(arr.shape)}")
    return arr


def feature_shape(encoder: ImageEncoder, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) the encoder makes of one S x S image (probed on a black image)."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return tuple(encoder(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)).shape[1:])


def extract_features(encoder: ImageEncoder, images: Any, batch_size: int, out_path: str | Path,
                     dtype: str = "float16") -> dict[str, Any]:
    """Run `encoder` in eval mode over uint8 images (N, 3, S, S); write (N, C, h, w) `dtype` to out_path atomically.

    `images` is a LazyArray or an ndarray. Rows stream through a memory-mapped temporary file, so memory stays
    bounded by one batch; a failure leaves no file at out_path. bf16 autocast on CUDA only.
    """
    if dtype not in DTYPES or batch_size < 1:
        raise ValueError(f"dtype must be one of {DTYPES} and batch_size >= 1, got {dtype!r}, {batch_size}")
    arr = _uint8_images(images, str(getattr(images, "path", "images")))
    was_training = encoder.training
    encoder.eval()  # BatchNorm running statistics, no stochastic depth: what a frozen encoder computes
    start = time.perf_counter()
    try:
        shape = (len(arr), *feature_shape(encoder, arr.shape[-1]))
        with atomic_path(out_path) as tmp, torch.no_grad():
            if len(arr):
                _write_rows(encoder, arr, batch_size, np.lib.format.open_memmap(tmp, "w+", np.dtype(dtype), shape))
            else:  # an empty split (split.val: 0): nothing to map
                with open(tmp, "wb") as fh:  # a handle: np.save would append .npy to the temporary's name
                    np.save(fh, np.zeros(shape, dtype=dtype), allow_pickle=False)
    finally:
        encoder.train(was_training)
    seconds = time.perf_counter() - start
    log.info("features: %d images -> %s %s in %.1f s", len(arr), shape, dtype, seconds)
    return {"rows": shape[0], "shape": list(shape), "dtype": dtype, "bytes": Path(out_path).stat().st_size,
            "seconds": seconds}


def _write_rows(encoder: ImageEncoder, arr: np.ndarray, batch_size: int, out: np.memmap) -> None:
    """Fill the mapped (N, C, h, w) `out` batch by batch, then flush and unmap it."""
    device = next(encoder.parameters()).device
    for first in range(0, len(arr), batch_size):
        batch = torch.from_numpy(np.array(arr[first: first + batch_size])).to(device)  # (B, 3, S, S), out of the map
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = encoder(batch)  # (B, C, h, w)
        out[first: first + len(batch)] = feats.float().cpu().numpy()
    out.flush()
    del out  # unmapped before atomic_path renames the file


def weights_identity(captioner: CaptionerParams) -> str:
    """sha256 of the pretrained encoder's weights file (the same lookup the encoder itself does)."""
    path = pretrained_weights_file(captioner.encoder, captioner.encoder_weights)
    if path is None:
        raise ValueError(f"models.captioner.encoder {captioner.encoder!r}: features need a pretrained encoder "
                         f"(efficientnet_lite0, resnet18, resnet50); {captioner.encoder} starts from random weights")
    return f"sha256:{sha256_file(path)}"


def images_identity(coco_dir: str | Path, split: str) -> str:
    """The split's images.npy: its sha256 from prepare_coco's manifest, else its size and mtime."""
    coco_dir = Path(coco_dir)
    manifest = coco_dir / "manifest.json"
    digest = (read_json(manifest).get("sha256", {}) if manifest.is_file() else {}).get(f"{split}/images.npy")
    if digest:
        return f"sha256:{digest}"
    stat = (coco_dir / split / "images.npy").stat()
    return f"size:{stat.st_size},mtime_ns:{stat.st_mtime_ns}"


def write_manifest(features_dir: str | Path, captioner: CaptionerParams, coco_dir: str | Path, dtype: str,
                   extracted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write <features_dir>/manifest.json for the splits in `extracted` (extract_features' results)."""
    shapes = {tuple(e["shape"][1:]) for e in extracted.values()}
    if len(shapes) != 1:
        raise ValueError(f"{features_dir}: splits have different feature shapes {sorted(shapes)}")
    image_size = int(np.load(Path(coco_dir) / "train" / "images.npy", mmap_mode="r").shape[-1])
    manifest = {
        "enabled": True, "encoder": captioner.encoder, "weights": weights_identity(captioner),
        "freeze_encoder": captioner.freeze_encoder, "finetune_blocks": captioner.finetune_blocks,
        "image_size": image_size, "dtype": dtype, "feature_shape": list(shapes.pop()),
        "splits": {s: {"rows": e["rows"], "images": images_identity(coco_dir, s)} for s, e in extracted.items()},
    }
    write_json(Path(features_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(features_dir: str | Path) -> dict[str, Any]:
    """The manifest as a dict; FileNotFoundError / ValueError naming the file."""
    path = Path(features_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (features.enabled is true: {RERUN})")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("enabled"), bool):
        raise ValueError(f"{path}: expected an object with a boolean field 'enabled'")
    return manifest


def _expect(path: Path, field: str, found: Any, key: str, wanted: Any) -> None:
    if found != wanted:
        raise ValueError(f"{path}: {field} is {found}, {key} is {wanted}; {RERUN}")


def check_manifest(features_dir: str | Path, captioner: CaptionerParams, coco_dir: str | Path,
                   dtype: str | None = None) -> dict[str, Any]:
    """The manifest, after checking it matches the captioner params, the prepared images and the files on disk."""
    features_dir, coco_dir = Path(features_dir), Path(coco_dir)
    path = features_dir / MANIFEST
    m = read_manifest(features_dir)
    if not m["enabled"]:
        raise ValueError(f"{path}: enabled is false (written with features.enabled: false), "
                         f"features.enabled is true; {RERUN}")
    for field in ("encoder", "freeze_encoder", "finetune_blocks"):
        _expect(path, field, m.get(field), f"models.captioner.{field}", getattr(captioner, field))
    _expect(path, "weights", m.get("weights"), "the encoder's weights file", weights_identity(captioner))
    if dtype is not None:
        _expect(path, "dtype", m.get("dtype"), "features.dtype", dtype)
    for split in SPLITS:
        images = coco_dir / split / "images.npy"
        rows, *_, size = np.load(images, mmap_mode="r").shape
        _expect(path, "image_size", m.get("image_size"), f"the image size of {images}", size)
        entry = m.get("splits", {}).get(split, {})
        _expect(path, f"splits.{split}.images", entry.get("images"), str(images), images_identity(coco_dir, split))
        _expect(path, f"splits.{split}.rows", entry.get("rows"), f"the rows of {images}", rows)
        _check_file(features_dir / f"{split}.npy", (rows, *m.get("feature_shape", [])), m.get("dtype"))
    return m


def _check_file(path: Path, shape: tuple[int, ...], dtype: str | None) -> None:
    """A feature file of the manifest's shape and dtype; ValueError naming it otherwise."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; {RERUN}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err}); {RERUN}") from None
    if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
        raise ValueError(f"{path}: expected {dtype} {tuple(shape)} (manifest.json), got {arr.dtype} "
                         f"{tuple(arr.shape)}; {RERUN}")
