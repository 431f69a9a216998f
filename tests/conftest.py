"""Shared fixtures: the real params.yaml shrunk once through TINY, with every path under tmp_path."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from pipeline.params import Params, load_params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from tests (offline anyway)
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
    "features.batch_size": 8,
    "models.captioner.embed_size": 16,
    "models.captioner.hidden_size": 32,
    "models.captioner.attention_size": 16,
    "models.captioner.ff_size": 32,
    "models.captioner.heads": 2,
    "models.captioner.layers": 1,
    "models.lstm_lm.embed_size": 16,
    "models.lstm_lm.hidden_size": 32,
    "models.lstm_lm.layers": 1,
    "models.transformer_lm.d_model": 32,
    "models.transformer_lm.layers": 1,
    "models.transformer_lm.heads": 2,
    "models.transformer_lm.ff_size": 64,
    "models.transformer_lm.context": 32,
    "runtime.threads": 1,
    "train.accelerator": "cpu",
    "train.captioner.max_epochs": 1,
    "train.captioner.batch_size": 8,
    "train.lstm_lm.max_epochs": 1,
    "train.lstm_lm.batch_size": 8,
    "train.lstm_lm.bptt": 32,
    "train.transformer_lm.max_epochs": 1,
    "train.transformer_lm.batch_size": 8,
    "evaluate.beam_size": 2,
    "evaluate.meteor": False,
    "evaluate.sample_length": 20,
    "report.test_images": 3,
    "report.attention_images": 2,
    "report.projection_words": 30,
}


def tiny_corpus(root: Path, chars: int = 8000) -> Path:
    """A small real-prose text file (the head of Python's documentation topics) for fast LM tests."""
    from pipeline.data.text import default_corpus

    path = root / "corpus.txt"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(text for _, text in default_corpus())[:chars], encoding="utf-8")
    return path


def tiny_overrides(root: Path) -> dict[str, object]:
    """TINY plus every output path (and the sample as COCO input) moved under `root`."""
    paths = {k: str(root / v) for k, v in {
        "sample": "data/sample", "coco": "data/prepared/coco", "text": "data/prepared/text",
        "vocab": "data/vocab", "encoded": "data/encoded", "embeddings": "artifacts/embeddings",
        "features": "data/features", "models": "artifacts/models", "sweeps": "artifacts/sweeps",
        "ray_storage": "ray_results", "metrics": "metrics", "reports": "reports",
        "evaluation": "artifacts/evaluation"}.items()}
    return {
        **TINY,
        **{f"paths.{k}": v for k, v in paths.items()},
        "data.coco.annotations": f"{paths['sample']}/annotations/captions.json",
        "data.coco.images": f"{paths['sample']}/images",
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "data.text.files": [str(tiny_corpus(root))],
    }


def overrides_under(prepared: Params, root: Path) -> dict[str, object]:
    """TINY on already-prepared data, with models, metrics, sweeps and MLflow written under `root`."""
    return {**TINY, **{f"paths.{k}": v for k, v in prepared.paths.model_dump().items()},
            **{f"paths.{k}": str(root / k) for k in ("models", "metrics", "sweeps", "reports", "evaluation")},
            "data.coco.annotations": prepared.data.coco.annotations, "data.coco.images": prepared.data.coco.images,
            "tracking.uri": f"sqlite:///{root / 'mlflow.db'}"}


def params_under(prepared: Params, root: Path, **overrides: object) -> Params:
    """overrides_under as Params, plus test-specific overrides."""
    return load_params(ROOT / "params.yaml", {**overrides_under(prepared, root), **overrides})


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    """The real params.yaml, shrunk, writing under tmp_path."""
    return load_params(ROOT / "params.yaml", tiny_overrides(tmp_path))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a 2-core machine: a second intra-op thread only adds contention (10-20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prepared_params(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """Tiny params whose data stages (sample .. embeddings) have run once for the whole session."""
    from stages import embeddings, prepare_coco, prepare_text, sample, vocab

    p = load_params(ROOT / "params.yaml", tiny_overrides(tmp_path_factory.mktemp("prepared")))
    for stage in (sample, prepare_coco, prepare_text, vocab, embeddings):
        stage.run(p)
    return p


@pytest.fixture
def shared_data() -> Path:
    """../shared/data when present (integration tests), else skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """A local Ray with the dashboard: Ray Train V2 frees a stopped trial's workers through the State API it serves."""
    import ray

    from pipeline.tuning import init_ray

    started = init_ray(None, dashboard=True)
    yield
    if started:
        ray.shutdown()


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """A ThreadingHTTPServer on a free port of 127.0.0.1, serving from a thread until the block ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
