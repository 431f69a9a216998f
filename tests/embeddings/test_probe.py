"""Nearest neighbours and analogies on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary
from pipeline.embeddings.probe import analogy, nearest, normalise, probe
from pipeline.tokens import SPECIALS

VOCAB = Vocabulary([*SPECIALS, "a", "b", "c", "d", "e"])


def _matrix() -> np.ndarray:
    m = np.zeros((len(VOCAB), 2), np.float32)
    m[1:4] = [1.0, 0.01]  # specials point where `a` points: they must never be neighbours
    m[VOCAB.index["a"]] = [1.0, 0.0]
    m[VOCAB.index["b"]] = [10.0, 1.0]  # long vector, nearly a's direction: cosine ignores length
    m[VOCAB.index["c"]] = [0.0, 1.0]
    m[VOCAB.index["d"]] = [-1.0, 0.0]
    m[VOCAB.index["e"]] = [1.0, 1.0]
    return m


def test_normalise_unit_rows_and_zero_rows_stay_zero():
    unit = normalise(_matrix())
    norms = np.linalg.norm(unit, axis=1)
    assert norms[0] == 0
    np.testing.assert_allclose(norms[1:], 1.0, rtol=1e-6)


def test_nearest_order_excludes_self_and_specials():
    result = nearest(_matrix(), VOCAB, "a", k=10)
    assert [w for w, _ in result] == ["b", "e", "c", "d"]
    sims = [s for _, s in result]
    assert sims == sorted(sims, reverse=True)
    assert sims[0] == pytest.approx(10 / np.sqrt(101), rel=1e-5)
    assert sims[-1] == pytest.approx(-1.0, rel=1e-5)
    assert len(nearest(_matrix(), VOCAB, "a", k=2)) == 2


def test_nearest_unknown_word_raises():
    with pytest.raises(KeyError, match="zebra"):
        nearest(_matrix(), VOCAB, "zebra", k=2)
    with pytest.raises(KeyError):
        nearest(_matrix(), VOCAB, "<unk>", k=2)


def test_probe_reports_missing_words():
    found, missing = probe(_matrix(), VOCAB, ["c", "zebra", "a"], k=1)
    assert list(found) == ["c", "a"]
    assert found["a"][0][0] == "b" and found["c"][0][0] == "e"
    assert missing == ["zebra"]


def test_analogy_uses_directions():
    vocab = Vocabulary([*SPECIALS, "man", "king", "woman", "queen", "royal", "person"])
    m = np.zeros((len(vocab), 3), np.float32)
    m[[vocab.index[w] for w in ("man", "king", "woman", "queen", "royal", "person")]] = [
        [1, 0, 0], [2, 2, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 0, 1]]
    result = analogy(m, vocab, "man", "king", "woman", k=3)
    # target = (1/√2 - 1, 1/√2, 1): cosines queen ≈ 0.96, royal ≈ 0.56, person ≈ 0.40
    assert [w for w, _ in result] == ["queen", "royal", "person"]
    t = np.array([2 ** -0.5 - 1, 2 ** -0.5, 1.0])
    assert result[0][1] == pytest.approx(float(t @ [0, 1, 1]) / np.sqrt(2) / np.linalg.norm(t), rel=1e-5)


def test_analogy_missing_word_and_shape_mismatch():
    with pytest.raises(KeyError, match="zebra"):
        analogy(_matrix(), VOCAB, "a", "zebra", "c")
    with pytest.raises(ValueError, match="does not match"):
        nearest(np.zeros((3, 2)), VOCAB, "a", k=1)
