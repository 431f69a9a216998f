"""prepare_coco on the real COCO sample (179 images, 895 captions) from ../shared/data."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from pipeline.data.coco import REASONS, prepare_coco

pytestmark = pytest.mark.shared_data


def reference_row(path, size: int) -> np.ndarray:
    """Independent resize: full decode, EXIF orientation, centre square, bicubic -> (3, S, S)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im.convert("RGB"))
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def test_coco_sample_prepares_cleanly(shared_data, tmp_path):
    src = shared_data / "coco-sample"
    ann = src / "annotations" / "captions.json"
    stats = prepare_coco(tmp_path / "out", ann, src / "images", val_annotations=None, val_images=None,
                         image_size=64, val=20, test=20, seed=1337, max_skipped_fraction=0.0, workers=1,
                         chunk_size=32, max_caption_tokens=50)
    assert stats["images"] == 179 and stats["captions"] == 895
    assert stats["skipped"] == dict.fromkeys(REASONS, 0)
    assert stats["splits"] == {"train": 139, "val": 20, "test": 20}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    seen = set()
    for split in ("train", "val", "test"):
        arr = np.load(tmp_path / "out" / split / "images.npy", mmap_mode="r")
        text = (tmp_path / "out" / split / "captions.jsonl").read_text("utf-8")
        lines = [json.loads(x) for x in text.splitlines()]
        assert arr.shape == (len(lines), 3, 64, 64)
        for rec in lines:
            assert rec["raw"] == [a["caption"] for a in coco.imgToAnns[rec["image_id"]]]
            assert len(rec["captions"]) == 5 and all(c == [t.lower() for t in c] for c in rec["captions"])
        seen |= {r["image_id"] for r in lines}
        for i in (0, len(lines) - 1):  # rows hold the named image (draft decoding may differ slightly)
            ref = reference_row(src / "images" / lines[i]["file_name"], 64)
            assert np.abs(arr[i].astype(int) - ref).mean() < 6
    assert seen == set(coco.getImgIds())
