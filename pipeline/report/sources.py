"""Read what the report shows: metrics files, learning curves, `dvc metrics diff`, what evaluate@ wrote."""

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

from pipeline.io import read_json, timings_path
from pipeline.params import flatten_keys
from pipeline.report.examples import CaptionExample

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
    return {name: value for name, value in flatten_keys(tree, prefix).items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def metrics_files(metrics_dir: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """file name -> its numeric metrics, for every metrics/*.json (sorted by name)."""
    if not metrics_dir.is_dir():
        return {}
    return {path.name: flatten_numbers(read_optional_json(path) or {})
            for path in sorted(metrics_dir.glob("*.json")) if path.name not in exclude}


def read_metrics(metrics_dir: Path, name: str) -> dict[str, Any] | None:
    """A stage's metrics file with its timings merged back (pipeline.io.write_metrics keeps them apart); None
    when the stage has not run. For what the report shows beside results, e.g. a sweep's wall seconds."""
    metrics = read_optional_json(metrics_dir / name)
    timings = read_optional_json(timings_path(metrics_dir / name))
    return metrics if metrics is None or timings is None else _merged(metrics, timings)


def _merged(tree: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`tree` with `extra`'s leaves added at the same paths (nested dicts merged, not replaced)."""
    out = dict(tree)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    """A test image as evaluate@captioner captioned it, with its pixels (3, S, S uint8) from the prepared split."""

    example: CaptionExample
    image: np.ndarray


def captioned_images(examples: list[CaptionExample], shard: Path) -> list[CaptionedImage]:
    """Each example with its pixels: row image_index of the prepared split's images.npy (data, not a model)."""
    images = np.load(shard, mmap_mode="r")  # (N, 3, S, S) uint8
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{shard}: expected (N, 3, S, S) images, got {images.shape}")
    out = []
    for ex in examples:
        if not 0 <= ex.image_index < images.shape[0]:
            raise ValueError(f"{shard}: no row {ex.image_index} ({images.shape[0]} images): the captions are of "
                             "other data (run: dvc repro evaluate@captioner)")
        out.append(CaptionedImage(ex, np.array(images[ex.image_index])))  # a copy, not a view of the mapped file
    return out


def frequent_words(words_json: Path, matrix: np.ndarray, count: int) -> tuple[list[str], np.ndarray]:
    """The `count` most frequent words (the vocabulary is sorted by count) and their vectors (N, D)."""
    from pipeline.data.vocab import Vocabulary
    from pipeline.tokens import SPECIALS

    vocab = Vocabulary.load(words_json)
    if matrix.ndim != 2 or matrix.shape[0] != len(vocab):
        raise ValueError(f"embedding matrix {matrix.shape} does not match {words_json} ({len(vocab)} words)")
    first = len(SPECIALS)
    rows = np.arange(first, min(len(vocab), first + count))
    rows = rows[np.linalg.norm(matrix[rows], axis=1) > 0]  # words never trained stay at zero: nothing to place
    return [vocab.tokens[i] for i in rows], matrix[rows]

