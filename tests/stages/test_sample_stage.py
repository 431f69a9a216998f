"""The `sample` stage writes the declared outs (paths.sample) and metrics/sample.json."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from pycocotools.coco import COCO

from pipeline.io import read_json
from stages.sample import run


def test_run_writes_the_set_and_metrics(tiny_params, capsys):
    stats = run(tiny_params)
    out, n = Path(tiny_params.paths.sample), tiny_params.sample.images
    coco = COCO(str(out / "annotations" / "captions.json"))
    assert len(coco.getImgIds()) == n and len(coco.getAnnIds()) == 5 * n
    size = tiny_params.sample.image_size
    files = sorted((out / "images").iterdir())
    assert len(files) == n and all(Image.open(f).size == (size, size) for f in files)
    assert read_json(Path(tiny_params.paths.metrics) / "sample.json") == stats
    assert stats["images"] == n and stats["captions"] == 5 * n and stats["captions_per_image"] == 5
    for key in ("kinds", "colours", "sizes"):
        assert sum(stats[key].values()) == stats["shapes"]
    assert sum(stats["shapes_per_image"].values()) == n
    assert f"{n:,} images" in capsys.readouterr().out


def test_run_twice_gives_identical_metrics_and_replaces_the_set(tiny_params):
    first = run(tiny_params)
    marker = Path(tiny_params.paths.sample) / "stale.txt"
    marker.write_text("left over from an older run")
    assert run(tiny_params) == first
    assert not marker.exists()  # the whole directory is replaced, not merged
