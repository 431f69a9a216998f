"""The prepared data the loading, training and sweep cases run on: the real params.yaml with every path
under the run's scratch folder, the data stages run once per bench run (shrunk with --quick)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context
from pipeline.params import Params, load_params

log = logging.getLogger(__name__)

PATH_KEYS = ("sample", "coco", "text", "vocab", "encoded", "embeddings", "models", "sweeps", "ray_storage",
             "metrics", "evaluation")

# --quick: seconds instead of minutes, for checking the plumbing (figures from it mean nothing).
QUICK: dict[str, Any] = {
    "sample.images": 40, "sample.image_size": 48, "prepare_coco.image_size": 32, "prepare_coco.split.val": 8,
    "prepare_coco.split.test": 8, "prepare_coco.workers": 1, "prepare_coco.chunk_size": 8,
    "prepare_text.split.val": 0.1, "prepare_text.split.test": 0.1, "vocab.min_freq": 1, "vocab.max_size": 500,
    "models.captioner.embed_size": 16, "models.captioner.hidden_size": 32, "models.captioner.attention_size": 16,
    "models.captioner.ff_size": 32, "models.captioner.heads": 2, "models.captioner.layers": 1,
    "models.lstm_lm.embed_size": 16, "models.lstm_lm.hidden_size": 32, "models.lstm_lm.layers": 1,
    "models.transformer_lm.d_model": 32, "models.transformer_lm.layers": 1, "models.transformer_lm.heads": 2,
    "models.transformer_lm.ff_size": 64, "models.transformer_lm.context": 32,
    "train.captioner.batch_size": 8, "train.lstm_lm.batch_size": 8, "train.lstm_lm.bptt": 32,
    "train.transformer_lm.batch_size": 8,
}
QUICK_CORPUS_CHARS = 12_000


def _quick_corpus(root: Path) -> str:
    """The head of Python's documentation topics as a small text file."""
    from pipeline.data.text import default_corpus

    path = root / "corpus.txt"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text for _, text in default_corpus())[:QUICK_CORPUS_CHARS], encoding="utf-8")
    return str(path)


def bench_params(ctx: Context, root: Path, **extra: Any) -> Params:
    """params.yaml with paths under `root`, QUICK when --quick, the run's --set overrides, then `extra`."""
    paths = {f"paths.{k}": str(root / k) for k in PATH_KEYS}
    overrides: dict[str, Any] = {**paths, "data.coco.annotations": str(root / "sample/annotations/captions.json"),
                                 "data.coco.images": str(root / "sample/images"),
                                 "tracking.uri": f"sqlite:///{root / 'mlflow.db'}"}
    if ctx.quick:
        overrides.update(QUICK, **{"data.text.files": [_quick_corpus(root)]})
    return load_params(ROOT / "params.yaml", {**overrides, **ctx.overrides, **extra})


def prepared(ctx: Context) -> Params:
    """Params over data prepared once per bench run (sample, prepare_coco, prepare_text, vocab)."""
    if "workspace" not in ctx.cache:
        from stages import prepare_coco, prepare_text, sample, vocab

        p = bench_params(ctx, ctx.scratch / "workspace")
        log.info("preparing the bench data under %s", ctx.scratch / "workspace")
        with contextlib.redirect_stdout(io.StringIO()):  # the stages' one-line summaries
            for stage in (sample, prepare_coco, prepare_text, vocab):
                stage.run(p)
        ctx.cache["workspace"] = p
    return ctx.cache["workspace"]
