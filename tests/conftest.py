"""Shared fixtures: the real params.yaml shrunk once through TINY, with every path under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The one place tests shrink the real defaults. Paths are filled in per test by tiny_params.
TINY: dict[str, object] = {
    "sample.images": 24,
    "sample.image_size": 48,
    "prepare_coco.image_size": 32,
    "prepare_coco.split.val": 4,
    "prepare_coco.split.test": 4,
    "prepare_coco.workers": 1,
    "prepare_coco.chunk_size": 8,
    "prepare_text.split.val": 0.1,
    "prepare_text.split.test": 0.1,
    "vocab.min_freq": 1,
    "vocab.max_size": 500,
    "embeddings.dim": 8,
    "embeddings.epochs": 1,
    "embeddings.batch_size": 256,
    "embeddings.probe_words": ["red", "circle"],
    "embeddings.neighbours": 3,
}


def tiny_overrides(root: Path) -> dict[str, object]:
    """TINY plus every output path (and the sample as COCO input) moved under `root`."""
    paths = {k: str(root / v) for k, v in {
        "sample": "data/sample", "coco": "data/prepared/coco", "text": "data/prepared/text",
        "vocab": "data/vocab", "encoded": "data/encoded", "embeddings": "artifacts/embeddings",
        "metrics": "metrics"}.items()}
    return {
        **TINY,
        **{f"paths.{k}": v for k, v in paths.items()},
        "data.coco.annotations": f"{paths['sample']}/annotations/captions.json",
        "data.coco.images": f"{paths['sample']}/images",
    }


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    """The real params.yaml, shrunk, writing under tmp_path."""
    return load_params(ROOT / "params.yaml", tiny_overrides(tmp_path))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data when present (integration tests), else skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
