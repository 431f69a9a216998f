"""Stage prepare_text: default corpus and user files -> split text, word lines, metrics."""

import json
from pathlib import Path

import pytest

from pipeline.params import load_params
from stages import prepare_text
from tests.conftest import ROOT, tiny_overrides


def test_default_corpus_run(tmp_path):
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "data.text.files": []})
    metrics = prepare_text.run(p)
    assert metrics["source"] == ["pydoc_data.topics"] and metrics["documents"] > 50
    out = Path(p.paths.text)
    for split in ("train", "val", "test"):
        text = (out / f"{split}.txt").read_text("utf-8")
        words = (out / f"{split}.words.txt").read_text("utf-8").split()
        assert len(text) == metrics["characters"][split] > 0
        assert len(words) == metrics["words"][split] > 0
    assert metrics["characters"]["train"] > 8 * metrics["characters"]["val"]
    on_disk = json.loads((Path(p.paths.metrics) / "prepare_text.json").read_text())
    assert on_disk == metrics


def test_user_files_replace_default(tmp_path):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("".join(f"The Cat sat on mat number {i}.\n" for i in range(50)))
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "data.text.files": [str(corpus)]})
    metrics = prepare_text.run(p)
    assert metrics["source"] == [str(corpus)] and metrics["lines"] == {"train": 40, "val": 5, "test": 5}
    train_words = (Path(p.paths.text) / "train.words.txt").read_text().split()
    assert "cat" in train_words and "Cat" not in train_words
    assert "The Cat" in (Path(p.paths.text) / "train.txt").read_text()


def test_too_little_text_fails_and_writes_nothing(tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("just one line\n")
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "data.text.files": [str(corpus)]})
    with pytest.raises(ValueError, match="val split came out empty"):
        prepare_text.run(p)
    assert not Path(p.paths.text).exists()
