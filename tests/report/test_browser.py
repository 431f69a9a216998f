"""The report in a real browser: headless Chromium renders a non-blank page with every section."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.report.browser import dump_dom, find_chromium, screenshot
from stages.report import report_path

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
SECTIONS = ("captioner", "curves", "sweeps", "language-models", "embeddings", "metrics")


def test_screenshot_is_not_blank(built, tmp_path):
    p, _ = built
    out = screenshot(report_path(p), tmp_path / "report.png", width=1000, height=1400)
    image = Image.open(out)
    assert image.size == (1000, 1400)
    pixels = np.asarray(image.convert("L"), dtype=np.float32)  # (H, W)
    assert pixels.std() > 20  # text, tables and figures: far from one flat colour
    assert (pixels < 128).mean() > 0.01  # a blank (white) page has no dark pixels at all
    rows = (pixels < 200).any(axis=1)
    assert rows[: 700].mean() > 0.2 and rows[700:].mean() > 0.2  # content down the page, not only a header


def test_dom_has_every_section_and_loaded_images(built):
    p, metrics = built
    dom = dump_dom(report_path(p))
    ids = re.findall(r'<section id="([^"]+)"', dom)
    assert tuple(ids) == SECTIONS
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == metrics["figures"]
    assert "<h1>capline report</h1>" in dom


def test_capline_report_writes_a_screenshot(built, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.params import flatten_keys
    from tests.conftest import ROOT

    p, _ = built
    monkeypatch.chdir(Path(p.paths.reports).parent)  # its own cwd: no git repository, so no metrics diff
    sets = [f"{k}={json.dumps(v)}" for k, v in flatten_keys(p.to_dict()).items()]
    args = ["report", "--screenshot", str(tmp_path / "shot.png"), "--width", "800", "--height", "600",
            "--no-progress", "--params", str(ROOT / "params.yaml"), *(x for s in sets for x in ("--set", s))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "shot.png").size == (800, 600)
    assert f"screenshot: {tmp_path / 'shot.png'}" in result.output
