"""Caption metrics through pycocoevalcap, NLTK BLEU-4 parity, METEOR's Java process, LM conversions."""

from __future__ import annotations

import gc
import math
import random
import shutil

import numpy as np
import psutil
import pytest

from pipeline.metrics import (
    JAVA_MISSING,
    _meteor_score,
    bits,
    caption_scores,
    nltk_bleu4,
    perplexity,
    unigram_cross_entropy,
)

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["left", "right", "top", "bottom", "centre"]


def shape_groups(n: int = 20, seed: int = 0) -> tuple[dict[int, list[str]], dict[int, str]]:
    """n reference groups of shape captions and hypotheses of >= 4 tokens that partly match them."""
    rng = random.Random(seed)
    refs, hyps = {}, {}
    for i in range(n):
        c, s, p = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(PLACES)
        refs[i] = [f"a {c} {s} on the {p}", f"there is a {c} {s} at the {p}", f"{c} {s} {p}"]
        hyps[i] = f"a {rng.choice(COLOURS)} {s} on the {rng.choice(PLACES)}" + " side" * (i % 3)
    return refs, hyps


def java_children() -> list[psutil.Process]:
    """Java processes started by this test process (METEOR's JVM)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "java" in child.name().lower():
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def test_identical_captions_score_perfectly() -> None:
    refs, _ = shape_groups(6)
    hyps = {k: v[0] for k, v in refs.items()}
    scores = caption_scores(refs, hyps, meteor=False)
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)  # pycocoevalcap adds 1e-9 to denominators
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] > 0
    assert nltk_bleu4(refs, hyps) == pytest.approx(1.0)
    assert all(isinstance(scores[k], float) for k in ("bleu_4", "rouge_l", "cider"))


def test_disjoint_captions_score_zero() -> None:
    refs = {1: ["a red circle on the left"], 2: ["two blue squares at the top"]}
    hyps = {1: "seven quiet dogs sleeping outside", 2: "an old wooden boat drifting"}
    scores = caption_scores(refs, hyps, meteor=False)
    for n in range(1, 5):
        assert scores[f"bleu_{n}"] == pytest.approx(0.0, abs=1e-6)
    assert scores["rouge_l"] == 0.0
    assert scores["cider"] == 0.0
    assert nltk_bleu4(refs, hyps) == 0.0


def test_meteor_not_requested() -> None:
    refs, hyps = shape_groups(3)
    scores = caption_scores(refs, hyps, meteor=False)
    assert scores["meteor"] is None
    assert "not computed" in scores["meteor_error"]


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java on PATH")
def test_meteor_with_java_handles_empty_hypothesis_and_leaves_no_process() -> None:
    assert not java_children()
    refs, _ = shape_groups(5)
    hyps = {k: v[0] for k, v in refs.items()}
    hyps[2] = ""  # an empty caption must be scored, not crash the JVM protocol
    scores = caption_scores(refs, hyps, meteor=True)
    assert "meteor_error" not in scores
    # four of five captions are perfect and the empty one scores 0: clearly inside (0, 1)
    assert 0.5 < scores["meteor"] < 1.0
    gc.collect()  # the wrapper's __del__ must not block either
    assert not java_children()


def test_meteor_without_java_reports_instead_of_crashing(tmp_path, monkeypatch) -> None:
    refs, hyps = shape_groups(4)
    expected = caption_scores(refs, hyps, meteor=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java anywhere on PATH
    scores = caption_scores(refs, hyps, meteor=True)
    assert scores["meteor"] is None
    assert scores["meteor_error"] == JAVA_MISSING
    assert "Java 8+" in scores["meteor_error"] and "java not found" in scores["meteor_error"]
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert scores[key] == expected[key]
    assert not java_children()


def fake_java(folder, body: str) -> str:
    """A `java` executable on a PATH of its own: a JVM that fails or never answers."""
    script = folder / "java"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(folder)


def test_meteor_failing_java_is_reported_with_its_stderr(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", fake_java(tmp_path, "echo 'UnsupportedClassVersionError' >&2; exit 1"))
    refs, hyps = shape_groups(3)
    scores = caption_scores(refs, hyps, meteor=True)
    assert scores["meteor"] is None
    assert scores["meteor_error"].startswith("METEOR failed")
    assert "UnsupportedClassVersionError" in scores["meteor_error"]
    assert scores["bleu_4"] > 0


def test_meteor_that_never_answers_is_killed_after_the_timeout(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", fake_java(tmp_path, f"exec {shutil.which('sleep')} 300"))
    refs, hyps = shape_groups(2)
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # e.g. multiprocessing's tracker
    score, error = _meteor_score(refs, {k: [h] for k, h in hyps.items()}, timeout=1.0)
    assert score is None and "no answer within 1 s" in error
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid not in before
                and c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_empty_hypotheses_score_zero_without_crashing() -> None:
    refs, _ = shape_groups(4)
    hyps = {k: "" for k in refs}
    scores = caption_scores(refs, hyps, meteor=False)
    assert scores["bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert scores["rouge_l"] == 0.0 and scores["cider"] == 0.0
    assert nltk_bleu4(refs, hyps) == 0.0


def test_whitespace_and_separator_are_normalised() -> None:
    refs, hyps = shape_groups(5)
    messy = {k: "  " + h.replace(" ", " \n ", 1) + " ||| " for k, h in hyps.items()}
    assert caption_scores(refs, messy, meteor=False) == caption_scores(refs, hyps, meteor=False)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="ids differ"):
        caption_scores({1: ["a b"]}, {2: "a b"}, meteor=False)
    with pytest.raises(ValueError, match=r"references\[1\]"):
        caption_scores({1: []}, {1: "a b"}, meteor=False)
    with pytest.raises(ValueError, match=r"hypotheses\[1\]"):
        nltk_bleu4({1: ["a b"]}, {1: ["a", "b"]})
    with pytest.raises(ValueError, match="no hypotheses"):
        caption_scores({}, {}, meteor=False)


def test_nltk_and_coco_bleu4_agree_when_every_hypothesis_has_four_tokens() -> None:
    # Both clip n-gram counts by the max over references, pick the closest reference length with
    # ties to the shorter one, and use BP = exp(1 - r/c). pycocoevalcap only adds 1e-15 to match
    # counts and 1e-9 to n-gram totals; observed difference ~1e-11.
    refs, hyps = shape_groups(20)
    coco = caption_scores(refs, hyps, meteor=False)["bleu_4"]
    assert 0.1 < coco < 0.9  # a non-trivial corpus
    assert nltk_bleu4(refs, hyps) == pytest.approx(coco, abs=1e-9)


def test_nltk_and_coco_bleu4_differ_exactly_by_short_hypotheses() -> None:
    # The one real difference: NLTK's modified_precision divides by max(1, #k-grams), so a
    # hypothesis with fewer than k tokens adds 1 to the corpus k-gram total where pycocoevalcap adds
    # 0 (here ~1e-2 on BLEU-4). So nltk = coco * prod_k (g_k / (g_k + m_k))^(1/4), with g_k the
    # k-grams and m_k the hypotheses shorter than k.
    refs, hyps = shape_groups(20)
    hyps[3], hyps[5], hyps[8] = "a red", "", "blue circle on"
    coco = caption_scores(refs, hyps, meteor=False)["bleu_4"]
    lengths = [len(h.split()) for h in hyps.values()]
    factor = 1.0
    for k in range(1, 5):
        g = sum(max(0, n - k + 1) for n in lengths)
        m = sum(n < k for n in lengths)
        factor *= (g / (g + m)) ** 0.25
    assert factor < 1 - 1e-3  # the short hypotheses really matter here
    assert nltk_bleu4(refs, hyps) == pytest.approx(coco * factor, rel=1e-9)


def test_unigram_cross_entropy_by_hand() -> None:
    train = np.array([0, 0, 1], dtype=np.int32)
    evals = np.array([0, 2], dtype=np.int64)
    # add-one over V=3 with N=3: p = (count + 1) / 6
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert unigram_cross_entropy(train, evals, 3) == pytest.approx(expected)


def test_unigram_cross_entropy_uniform_without_training_data() -> None:
    evals = np.arange(10) % 7
    assert unigram_cross_entropy(np.array([], dtype=np.int32), evals, 7) == pytest.approx(math.log(7))


def test_unigram_cross_entropy_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match=r"eval_ids: ids must lie in \[0, 3\)"):
        unigram_cross_entropy(np.array([0, 1]), np.array([3]), 3)
    with pytest.raises(ValueError, match="train_ids: expected integer"):
        unigram_cross_entropy(np.array([0.5]), np.array([0]), 3)
    with pytest.raises(ValueError, match="eval_ids is empty"):
        unigram_cross_entropy(np.array([0]), np.array([], dtype=np.int64), 3)


def test_perplexity_and_bits() -> None:
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    assert bits(math.log(2.0)) == pytest.approx(1.0)
    assert bits(math.log(256.0)) == pytest.approx(8.0)
    assert bits(1.7) == pytest.approx(math.log2(perplexity(1.7)))
