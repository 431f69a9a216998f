"""Stage prepare_coco: the generated sample in; split arrays, captions, manifest and metrics out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.coco import REASONS, CocoFormatError
from pipeline.params import load_params
from stages import prepare_coco, sample
from tests.conftest import ROOT, tiny_overrides


def test_run_prepares_the_sample_and_writes_metrics(tiny_params, capsys):
    sample.run(tiny_params)
    capsys.readouterr()
    stats = prepare_coco.run(tiny_params)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("prepare_coco: 24 images (train 16 / val 4 / test 4)")
    assert stats["images"] == 24 and stats["captions"] == 5 * 24
    assert stats["skipped"] == dict.fromkeys(REASONS, 0)
    assert stats["workers"] == 1 and stats["images_per_second"] > 0
    # the DVC metric: what a user compares; nothing skipped, so no `skipped` counts; timings beside it
    timing = ("check_seconds", "seconds", "images_per_second")
    on_disk = json.loads((Path(tiny_params.paths.metrics) / "prepare_coco.json").read_text())
    assert on_disk == {k: v for k, v in stats.items() if k != "skipped" and k not in timing}
    timings = json.loads((Path(tiny_params.paths.metrics) / "timings" / "prepare_coco.json").read_text())
    assert timings == {k: stats[k] for k in timing}
    coco = Path(tiny_params.paths.coco)
    manifest = json.loads((coco / "manifest.json").read_text())
    for split, n in stats["splits"].items():
        arr = np.load(coco / split / "images.npy", mmap_mode="r")
        assert arr.shape == (n, 3, 32, 32) and arr.dtype == np.uint8
        assert len((coco / split / "captions.jsonl").read_text().splitlines()) == n
        assert manifest["splits"][split]["images"] == n


def test_bad_annotations_fail_before_writing_anything(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": []}')
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "data.coco.annotations": str(bad)})
    with pytest.raises(CocoFormatError, match="broken.json: missing key 'annotations'"):
        prepare_coco.run(p)
    assert not Path(p.paths.coco).exists()
    assert not (Path(p.paths.metrics) / "prepare_coco.json").exists()
