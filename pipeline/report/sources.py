"""Read what the report shows: metrics files, learning curves, `dvc metrics diff`, model outputs."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import tracking
from pipeline.data.tokenize import detokenize
from pipeline.io import read_json

log = logging.getLogger(__name__)


def read_optional_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, None when the file does not exist; a malformed file is an error naming it."""
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_curve(path: Path) -> list[dict[str, float]] | None:
    """A learning-curve CSV (epoch, train_loss, val_loss, ...) as rows of numbers; None when absent."""
    if not path.is_file():
        return None
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), 2):
            try:
                rows.append({k: float(v) for k, v in row.items() if k and v not in ("", None)})
            except ValueError as err:
                raise ValueError(f"{path}:{n}: expected numbers ({err})") from None
            if "epoch" not in rows[-1]:
                raise ValueError(f"{path}:{n}: missing field 'epoch'")
    return rows


def flatten_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as dotted keys (what `dvc metrics` shows); text and lists skipped."""
    return {name: value for name, value in tracking.flatten(tree, prefix).items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def metrics_files(metrics_dir: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """file name -> its numeric metrics, for every metrics/*.json (sorted by name)."""
    if not metrics_dir.is_dir():
        return {}
    return {path.name: flatten_numbers(read_optional_json(path) or {})
            for path in sorted(metrics_dir.glob("*.json")) if path.name not in exclude}


def dvc_metrics_diff(repo_dir: Path, timeout: float = 300.0) -> tuple[dict[str, dict] | None, str]:
    """`dvc metrics diff --all --json` (HEAD against the workspace) keyed by metrics file name, and a note.

    None with the reason when there is nothing to compare with (no git/DVC repository, no commit).
    """
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", "--all", "--json"]
    try:
        done = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"dvc metrics diff could not run: {err}"
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"no previous commit to compare with (dvc metrics diff: {reason})"
    try:
        diff = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        return None, f"dvc metrics diff gave no JSON: {done.stdout[:200]!r}"
    if not diff:
        return None, "no previous commit to compare with (no committed metrics)"
    return {Path(path).name: entries for path, entries in diff.items()}, "change since the last commit (HEAD)"


@dataclass
class CaptionedImage:
    """One test image (3, S, S uint8), its beam-search words, its references and attention (T, N) if any."""

    image_id: int
    image: np.ndarray
    words: list[str]
    references: list[str]
    attention: torch.Tensor | None


def caption_test_images(module: Any, coco_dir: Path, count: int, beam_size: int, alpha: float,
                        no_repeat_ngram: int) -> list[CaptionedImage]:
    """Beam-search captions of the first `count` images of the prepared test split (as evaluate@ decodes them)."""
    from pipeline.data.coco import read_captions
    from pipeline.decoding import beam_search

    path = coco_dir / "test" / "images.npy"
    shard = np.load(path, mmap_mode="r")  # (N, 3, S, S) uint8
    size = int(module.hparams["image_size"])
    if shard.ndim != 4 or shard.shape[1] != 3 or shard.shape[2:] != (size, size):
        raise ValueError(f"{path}: expected (N, 3, {size}, {size}) images for this captioner, got {shard.shape}")
    records = read_captions(coco_dir / "test" / "captions.jsonl", shard.shape[0])
    count = min(count, shard.shape[0])
    if count == 0:
        return []
    images = np.array(shard[:count])  # (B, 3, S, S), a writable copy of the mapped file
    with torch.no_grad():
        memory = module.model.encode(torch.from_numpy(images).to(module.device))
        result = beam_search(module.model, memory, count, beam_size, module.model_cfg.max_len, alpha, no_repeat_ngram)
    attention = result.attention or [None] * count
    vocab = module.vocab_tokens
    return [CaptionedImage(rec["image_id"], images[i], [vocab[t] for t in result.tokens[i]],
                           [detokenize(c) for c in rec["captions"]], attention[i])
            for i, rec in enumerate(records[:count])]


def frequent_words(words_json: Path, matrix: np.ndarray, count: int) -> tuple[list[str], np.ndarray]:
    """The `count` most frequent words (the vocabulary is sorted by count) and their vectors (N, D)."""
    from pipeline.data.vocab import SPECIALS, Vocabulary

    vocab = Vocabulary.load(words_json)
    if matrix.ndim != 2 or matrix.shape[0] != len(vocab):
        raise ValueError(f"embedding matrix {matrix.shape} does not match {words_json} ({len(vocab)} words)")
    first = len(SPECIALS)
    rows = np.arange(first, min(len(vocab), first + count))
    rows = rows[np.linalg.norm(matrix[rows], axis=1) > 0]  # words never trained stay at zero: nothing to place
    return [vocab.tokens[i] for i in rows], matrix[rows]

