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
    # no Project Gutenberg boilerplate in pydoc topics: the all-zero `stripped` counts stay out of the DVC metric
    assert metrics["stripped"] == {"documents": 0, "characters": 0}
    assert on_disk == {k: v for k, v in metrics.items() if k != "stripped"}


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


def test_project_gutenberg_boilerplate_is_stripped_and_counted(tmp_path):
    header = ("The Project Gutenberg EBook of Cats\nRelease Date: 2001\n\n"
              "*** START OF THE PROJECT GUTENBERG EBOOK CATS ***\n")
    book = "".join(f"The Cat sat on mat number {i}.\n" for i in range(50))
    footer = "*** END OF THE PROJECT GUTENBERG EBOOK CATS ***\n\nSection 3. Donations to the Foundation\n"
    book_file, plain = tmp_path / "cats.txt", tmp_path / "plain.txt"
    book_file.write_text(header + book + footer)
    plain.write_text(book)
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "data.text.files": [str(book_file), str(plain)]})
    metrics = prepare_text.run(p)
    assert metrics["stripped"] == {"documents": 1, "characters": len(header) + len(footer)}
    assert metrics["lines"] == {"train": 80, "val": 10, "test": 10}  # 40/5/5 of each file, no marker lines
    text = "".join((Path(p.paths.text) / f"{s}.txt").read_text() for s in ("train", "val", "test"))
    assert "Gutenberg" not in text and "Donations" not in text and "Release Date" not in text


def test_default_corpus_has_nothing_to_strip(tmp_path):
    p = load_params(ROOT / "params.yaml", tiny_overrides(tmp_path))
    assert prepare_text.run(p)["stripped"] == {"documents": 0, "characters": 0}


def test_wikitext_tokens_reach_the_word_files_whole(tmp_path):
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("".join(f" = Section {i} = \n The <unk> of 1 @,@ 000 @-@ odd men . \n" for i in range(25)))
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "data.text.files": [str(corpus)]})
    prepare_text.run(p)
    words = (Path(p.paths.text) / "train.words.txt").read_text().split()
    assert words.count("<unk>") == 20 and words.count("@,@") == 20 and words.count("@-@") == 20
    assert "<" not in words and "unk" not in words and "@" not in words
