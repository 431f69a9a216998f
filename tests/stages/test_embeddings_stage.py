"""The embeddings stage end to end on tiny fixture inputs written under tmp_path."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary
from pipeline.params import Params, ParamsError, validate_params
from pipeline.tokens import SPECIALS
from stages.embeddings import run

CAPTIONS = [["a", "red", "circle", "on", "the", "left"], ["a", "small", "blue", "square"],
            ["the", "red", "square", "is", "small"], ["a", "blue", "circle", "on", "the", "right"]]
TEXT = [["call", "the", "function", "with", "a", "list"], ["an", "error", "in", "the", "string"]]


def _write_inputs(p: Params, sources: tuple[str, ...] = ("captions", "text")) -> Vocabulary:
    """words.json and the training id streams the vocab stage would write, for `sources`."""
    lines = {"captions": CAPTIONS * 30, "text": TEXT * 30}
    counts = Counter(t for s in sources for line in lines[s] for t in line)
    vocab = Vocabulary.build(counts, min_freq=1, max_size=500)
    vocab.save(Path(p.paths.vocab) / "words.json")
    encoded = Path(p.paths.encoded)
    encoded.mkdir(parents=True, exist_ok=True)
    for s in sources:
        np.save(encoded / f"{s}_train_word.npy", vocab.encode_stream(lines[s]))
    return vocab


def _with(p: Params, sources: list[str] | None = None, **embeddings) -> Params:
    """The tiny params with some `embeddings` keys (and vocab.sources) changed, re-validated."""
    raw = p.to_dict()
    raw["embeddings"].update(embeddings)
    if sources is not None:
        raw["vocab"]["sources"] = sources
    return validate_params(raw)


def _check_outputs(p: Params, vocab: Vocabulary, metrics: dict, dim: int) -> np.ndarray:
    words = np.load(Path(p.paths.embeddings) / "words.npy")
    assert words.shape == (len(vocab), dim) and words.dtype == np.float32
    assert (words[0] == 0).all()
    on_disk = json.loads((Path(p.paths.metrics) / "embeddings.json").read_text())
    assert on_disk == metrics
    assert metrics["dim"] == dim and metrics["vocab_size"] == len(vocab)
    for word, neighbours in metrics["probe"].items():
        assert len(neighbours) == p.embeddings.neighbours
        for neighbour, sim in neighbours:
            assert neighbour in vocab and neighbour not in SPECIALS and neighbour != word
            assert -1.0 <= sim <= 1.0
    return words


def test_skipgram_run_writes_vectors_and_metrics(tiny_params, capsys):
    vocab = _write_inputs(tiny_params)
    metrics = run(tiny_params)
    _check_outputs(tiny_params, vocab, metrics, tiny_params.embeddings.dim)
    assert metrics["method"] == "skipgram"
    assert metrics["training_pairs"] > 0 and math.isfinite(metrics["final_loss"])
    assert set(metrics["probe"]) == {"red", "circle"} and metrics["missing_probe_words"] == []
    assert capsys.readouterr().out.count("\n") == 1


def test_skipgram_run_is_deterministic_and_reports_missing_probes(tiny_params):
    _write_inputs(tiny_params)
    p = _with(tiny_params, probe_words=["zebra", "red"])
    first = run(p)
    words = np.load(Path(p.paths.embeddings) / "words.npy")
    assert run(p) == first
    np.testing.assert_array_equal(np.load(Path(p.paths.embeddings) / "words.npy"), words)
    assert first["missing_probe_words"] == ["zebra"] and list(first["probe"]) == ["red"]


def test_only_listed_sources_are_read(tiny_params):
    p = _with(tiny_params, sources=["text"], probe_words=["function"])
    vocab = _write_inputs(p, sources=("text",))  # no captions stream on disk
    metrics = run(p)
    assert metrics["vocab_size"] == len(vocab) and "function" in metrics["probe"]


def test_missing_inputs_name_the_file_and_write_nothing(tiny_params):
    with pytest.raises(FileNotFoundError, match="words.json"):
        run(tiny_params)
    _write_inputs(tiny_params, sources=("captions",))
    with pytest.raises(FileNotFoundError, match="text_train_word.npy"):
        run(tiny_params)
    assert not (Path(tiny_params.paths.embeddings) / "words.npy").exists()
    assert not (Path(tiny_params.paths.metrics) / "embeddings.json").exists()


def test_glove_run(tiny_params):
    p = _with(tiny_params, pretrained="glove-6b-50d", dim=50)
    vocab = _write_inputs(p)
    metrics = run(p)
    words = _check_outputs(p, vocab, metrics, 50)
    assert metrics["method"] == "glove-6b-50d"
    assert metrics["words_found"] == len(vocab) - len(SPECIALS)  # every fixture word is in GloVe
    assert np.abs(words[vocab.index["red"]]).max() > 0.1  # a real GloVe row, not the small init


def test_glove_with_other_dim_is_rejected(tiny_params):
    assert tiny_params.embeddings.dim != 50
    with pytest.raises(ParamsError, match="dim must be 50"):
        _with(tiny_params, pretrained="glove-6b-50d")
