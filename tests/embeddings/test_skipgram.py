"""Skip-gram: pair generation, negative sampling, subsampling, determinism and learning."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.embeddings.skipgram import (
    NEGATIVE_POWER,
    SkipGramConfig,
    keep_probability,
    load_stream,
    negative_cdf,
    sample_negatives,
    skipgram_pairs,
    subsample_mask,
    train_skipgram,
    word_counts,
)
from pipeline.tokens import END_ID, PAD_ID, START_ID, UNK_ID

E, U = END_ID, UNK_ID


def _positions(stream: np.ndarray) -> dict[int, tuple[int, int]]:
    """id -> (sentence, position among words) for a stream whose word ids are all distinct."""
    out, sent, pos = {}, 0, 0
    for t in stream.tolist():
        if t == END_ID:
            sent, pos = sent + 1, 0
        elif t >= 4:
            out[t] = (sent, pos)
            pos += 1
    return out


def test_pairs_stay_in_window_and_sentence_and_skip_specials():
    stream = np.array([4, 5, 6, 7, E, 8, 9, 10, U, 11, E, START_ID, 12, PAD_ID, 13, E, 14, E])
    where = _positions(stream)
    window = 2
    seen = set()
    for seed in range(30):
        c, o = skipgram_pairs(stream, window, np.random.default_rng(seed))
        assert c.shape == o.shape and c.size > 0
        assert (c >= 4).all() and (o >= 4).all()
        for a, b in zip(c.tolist(), o.tolist(), strict=True):
            (sa, pa), (sb, pb) = where[a], where[b]
            assert sa == sb, f"pair ({a}, {b}) crosses <end>"
            assert 1 <= abs(pa - pb) <= window
            seen.add((a, b))
    # Every distance-1 neighbour is always inside the sampled window; <unk> is skipped over.
    assert {(10, 11), (11, 10), (12, 13), (4, 5), (5, 4)} <= seen
    assert (4, 6) in seen  # distance 2 appears for some draws
    assert not any(14 in p for p in seen)  # a one-word sentence has no context


def test_pairs_sample_window_uniformly():
    n, window = 4000, 4
    stream = np.concatenate([np.arange(4, 4 + n), [E]])
    c, o = skipgram_pairs(stream, window, np.random.default_rng(0))
    dist = np.abs(c - o)
    assert dist.max() == window
    # Uniform effective window b in 1..W: P(pair at distance d) ∝ (W - d + 1).
    expected = np.array([window - d + 1 for d in range(1, window + 1)], float)
    observed = np.bincount(dist, minlength=window + 1)[1:]
    np.testing.assert_allclose(observed / observed.sum(), expected / expected.sum(), atol=0.02)
    # Interior centres get 2 * E[b] = W + 1 contexts on average.
    assert abs(c.size / n - (window + 1)) < 0.15


def test_pairs_respect_keep_mask():
    stream = np.array([4, 5, 6, 7, 8, E])
    keep = np.array([True, False, True, True, True, True])
    c, o = skipgram_pairs(stream, 1, np.random.default_rng(0), keep)
    pairs = set(zip(c.tolist(), o.tolist(), strict=True))
    assert 5 not in c and 5 not in o
    assert (4, 6) in pairs  # the window closes over the dropped token, as in word2vec


def test_negatives_follow_unigram_three_quarters():
    counts = np.array([0, 0, 0, 0, 1000, 300, 50, 0, 5, 1])
    counts_with_specials = counts.copy()
    counts_with_specials[:4] = 999  # specials must get no weight even if counted
    cdf = negative_cdf(word_counts(np.repeat(np.arange(10), counts_with_specials), 10))
    draws = sample_negatives(cdf, (200_000,), np.random.default_rng(1))
    freq = np.bincount(draws, minlength=10) / draws.size
    expected = counts ** NEGATIVE_POWER / (counts ** NEGATIVE_POWER).sum()
    np.testing.assert_allclose(freq, expected, atol=0.005)
    assert freq[:4].sum() == 0 and freq[7] == 0


def test_negatives_shape_and_range():
    cdf = negative_cdf(np.array([0, 0, 0, 0, 3, 0]))
    draws = sample_negatives(cdf, (7, 5), np.random.default_rng(0))
    assert draws.shape == (7, 5) and (draws == 4).all()


def test_subsampling_drops_frequent_words_more():
    rng = np.random.default_rng(3)
    stream = rng.permutation(np.repeat([4, 5, 6, E, U], [20_000, 2_000, 200, 500, 500]))
    counts = word_counts(stream, 7)
    t = 1e-2
    keep_p = keep_probability(counts, t)
    assert keep_p[4] < keep_p[5] <= keep_p[6] <= 1.0
    assert (keep_p[:4] == 0).all()
    mask = subsample_mask(stream, keep_p, rng)
    kept = {w: mask[stream == w].mean() for w in (4, 5, 6)}
    freq4 = counts[4] / counts.sum()
    assert abs(kept[4] - np.sqrt(t / freq4)) < 0.02
    assert kept[4] < kept[5] < kept[6]


CFG = SkipGramConfig(dim=8, window=2, negatives=3, subsample=1.0, epochs=2, batch_size=64, lr=0.02)


def _two_topics(n_sentences: int, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Sentences drawn from cluster A (ids 4..11) or cluster B (ids 12..19), never mixed."""
    rng = np.random.default_rng(seed)
    a, b = list(range(4, 12)), list(range(12, 20))
    parts = []
    for _ in range(n_sentences):
        words = rng.choice(a if rng.random() < 0.5 else b, size=6)
        parts.append(np.append(words, E))
    return np.concatenate(parts), a, b


def test_same_seed_same_vectors_other_seed_differs():
    stream, _, _ = _two_topics(60, 0)
    r1 = train_skipgram(stream, 22, CFG, seed=5)
    r2 = train_skipgram(stream, 22, CFG, seed=5)
    r3 = train_skipgram(stream, 22, CFG, seed=6)
    np.testing.assert_array_equal(r1.vectors, r2.vectors)
    assert r1.pairs == r2.pairs and r1.final_loss == r2.final_loss
    assert not np.allclose(r1.vectors, r3.vectors)


def test_learns_topic_clusters():
    stream, a, b = _two_topics(600, 1)
    cfg = SkipGramConfig(dim=16, window=3, negatives=5, subsample=1.0, epochs=5, batch_size=128, lr=0.02)
    result = train_skipgram(stream, 22, cfg, seed=0)
    vec = result.vectors
    assert vec.shape == (22, 16) and vec.dtype == np.float32
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True).clip(1e-12)
    words = a + b
    sims = unit[words] @ unit[words].T
    np.fill_diagonal(sims, -np.inf)
    best = np.array(words)[sims.argmax(1)]
    for w, nb in zip(words, best, strict=True):
        assert (w in a) == (nb in a), f"nearest neighbour of {w} is {nb}, in the other cluster"


def test_pad_zero_and_unseen_rows_keep_small_init():
    stream, _, _ = _two_topics(40, 2)
    result = train_skipgram(stream, 25, CFG, seed=0)  # ids 20..24 never occur
    assert (result.vectors[PAD_ID] == 0).all()
    unseen = result.vectors[20:]
    assert (np.abs(unseen) <= 0.5 / CFG.dim).all() and np.abs(unseen).sum() > 0
    assert np.abs(result.vectors[4:20]).max() > 0.5 / CFG.dim  # trained rows moved


def test_only_specials_is_an_error():
    with pytest.raises(ValueError, match="special tokens"):
        train_skipgram(np.array([U, E, U, E]), 6, CFG, seed=0)


def test_load_stream_checks(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.array([4, 5, E], dtype=np.int32))
    assert load_stream(good, 6).tolist() == [4, 5, E]
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_stream(tmp_path / "missing.npy", 6)
    bad_range = tmp_path / "range.npy"
    np.save(bad_range, np.array([4, 9], dtype=np.int32))
    with pytest.raises(ValueError, match=r"range\.npy.*\[0, 6\)"):
        load_stream(bad_range, 6)
    bad_shape = tmp_path / "shape.npy"
    np.save(bad_shape, np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="shape.npy.*1-D"):
        load_stream(bad_shape, 6)
