"""Quick looks at an embedding matrix: cosine nearest neighbours and word analogies."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.data.vocab import Vocabulary
from pipeline.tokens import SPECIALS

FIRST_WORD = len(SPECIALS)  # specials are never offered as neighbours


def normalise(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (V, D) float32; all-zero rows stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)  # (V, 1)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _check(matrix: np.ndarray, vocab: Vocabulary) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != len(vocab):
        raise ValueError(f"embedding matrix {matrix.shape} does not match a vocabulary of {len(vocab)}")


def _top(unit: np.ndarray, query: np.ndarray, vocab: Vocabulary, exclude: Sequence[int],
         k: int) -> list[tuple[str, float]]:
    """The k rows most cosine-similar to `query` (D,), skipping specials and `exclude`."""
    sims = unit @ query  # (V,)
    sims[:FIRST_WORD] = -np.inf
    sims[list(exclude)] = -np.inf
    k = min(k, int(np.isfinite(sims).sum()))
    best = np.argpartition(-sims, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
    best = best[np.argsort(-sims[best], kind="stable")]
    return [(vocab.tokens[i], float(sims[i])) for i in best]


def nearest(matrix: np.ndarray, vocab: Vocabulary, word: str, k: int) -> list[tuple[str, float]]:
    """The k words most cosine-similar to `word` (itself and specials excluded); KeyError if absent."""
    _check(matrix, vocab)
    if word not in vocab or vocab.index[word] < FIRST_WORD:
        raise KeyError(f"{word!r} is not a word in the vocabulary")
    unit = normalise(matrix)
    i = vocab.index[word]
    return _top(unit, unit[i], vocab, [i], k)


def analogy(matrix: np.ndarray, vocab: Vocabulary, a: str, b: str, c: str,
            k: int = 1) -> list[tuple[str, float]]:
    """a is to b as c is to ?: words nearest to b - a + c on unit vectors (a, b, c excluded)."""
    _check(matrix, vocab)
    missing = [w for w in (a, b, c) if w not in vocab]
    if missing:
        raise KeyError(f"not in the vocabulary: {', '.join(missing)}")
    unit = normalise(matrix)
    ia, ib, ic = (vocab.index[w] for w in (a, b, c))
    target = unit[ib] - unit[ia] + unit[ic]  # (D,)
    norm = np.linalg.norm(target)
    return _top(unit, target / (norm if norm > 0 else 1.0), vocab, [ia, ib, ic], k)


def probe(matrix: np.ndarray, vocab: Vocabulary, words: Iterable[str],
          k: int) -> tuple[dict[str, list[tuple[str, float]]], list[str]]:
    """Nearest neighbours of each probe word, and the probe words missing from the vocabulary."""
    found: dict[str, list[tuple[str, float]]] = {}
    missing: list[str] = []
    for word in words:
        try:
            found[word] = nearest(matrix, vocab, word, k)
        except KeyError:
            missing.append(word)
    return found, missing
