"""Stage vocab: vocabularies from prepared captions + text, encoded id streams, coverage metrics."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary
from pipeline.params import load_params
from pipeline.tokens import END_ID, UNK_ID
from stages import vocab as vocab_stage
from tests.conftest import ROOT, tiny_overrides

CAPTIONS = {
    "train": [["a", "red", "circle"], ["a", "blue", "square"], ["a", "red", "square"]],
    "val": [["a", "red", "star"]],
    "test": [["a", "blue", "circle"]],
}
TEXT = {"train": "Hello world.\nhello again\n", "val": "Hello there\n", "test": "world\n"}


def write_inputs(p) -> None:
    for split, caps in CAPTIONS.items():
        d = Path(p.paths.coco) / split
        d.mkdir(parents=True)
        record = {"image_index": 0, "image_id": 1, "file_name": "x.jpg", "captions": caps}
        (d / "captions.jsonl").write_text(json.dumps(record) + "\n")
    t = Path(p.paths.text)
    t.mkdir(parents=True)
    for split, text in TEXT.items():
        (t / f"{split}.txt").write_text(text)
        words = [" ".join(line.lower().replace(".", " .").split()) for line in text.splitlines()]
        (t / f"{split}.words.txt").write_text("\n".join(words) + "\n")


def test_vocab_stage_outputs(tmp_path):
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "vocab.min_freq": 2})
    write_inputs(p)
    metrics = vocab_stage.run(p)
    words = Vocabulary.load(Path(p.paths.vocab) / "words.json")
    chars = Vocabulary.load(Path(p.paths.vocab) / "chars.json")
    assert words.tokens[4:] == ["a", "hello", "red", "square"]  # count >= 2 over captions + text
    assert "H" in chars and "\n" in chars
    enc = Path(p.paths.encoded)
    test_ids = np.load(enc / "captions_test_word.npy")
    assert test_ids.tolist() == [words.index["a"], UNK_ID, UNK_ID, END_ID]
    char_ids = np.load(enc / "text_val_char.npy")
    assert "".join(chars.tokens[i] for i in char_ids) == TEXT["val"].replace("t", "<unk>")
    assert metrics["word_coverage"]["captions"]["test"]["oov_rate"] == 2 / 3
    assert json.loads((Path(p.paths.metrics) / "vocab.json").read_text()) == metrics


def test_vocab_sources_captions_only(tmp_path):
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "vocab.sources": ["captions"]})
    write_inputs(p)
    vocab_stage.run(p)
    words = Vocabulary.load(Path(p.paths.vocab) / "words.json")
    assert "hello" not in words and "circle" in words


def write_text_only(p, text: dict[str, str]) -> None:
    """Prepared text only (no COCO folder at all), words tokenised the way prepare_text does."""
    from pipeline.data.text import word_lines

    t = Path(p.paths.text)
    t.mkdir(parents=True)
    for split, body in text.items():
        (t / f"{split}.txt").write_text(body)
        (t / f"{split}.words.txt").write_text("".join(" ".join(w) + "\n" for w in word_lines(body, True)))


def test_text_only_vocabulary_needs_no_coco(tmp_path):
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "vocab.sources": ["text"]})
    write_text_only(p, TEXT)
    assert not Path(p.paths.coco).exists()
    metrics = vocab_stage.run(p)
    words = Vocabulary.load(Path(p.paths.vocab) / "words.json")
    assert words.tokens[4:] == ["hello", ".", "again", "world"]  # the train split only
    enc = Path(p.paths.encoded)
    assert sorted(f.name for f in enc.iterdir()) == sorted(
        f"text_{s}_{level}.npy" for s in ("train", "val", "test") for level in ("word", "char"))
    assert list(metrics["word_coverage"]) == ["text"] and metrics["sources"] == ["text"]


def test_captions_as_a_source_without_coco_names_the_file_and_the_stage(tmp_path):
    p = load_params(ROOT / "params.yaml", tiny_overrides(tmp_path))
    write_text_only(p, TEXT)
    with pytest.raises(FileNotFoundError, match=r"train/captions\.jsonl: not found \(vocab\.sources holds captions.*"
                                                r"dvc repro prepare_coco"):
        vocab_stage.run(p)
    assert not Path(p.paths.vocab).exists() and not Path(p.paths.encoded).exists()


def test_missing_text_names_the_file_and_the_stage(tmp_path):
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "vocab.sources": ["text"]})
    with pytest.raises(FileNotFoundError, match=r"train\.words\.txt: not found .*dvc repro prepare_text"):
        vocab_stage.run(p)


def test_wikitext_unk_is_encoded_as_the_vocabulary_unk(tmp_path):
    p = load_params(ROOT / "params.yaml", {**tiny_overrides(tmp_path), "vocab.sources": ["text"]})
    line = " the <unk> of 1 @,@ 000 @-@ odd <unk> . \n"
    write_text_only(p, {"train": line * 3, "val": line, "test": line})
    metrics = vocab_stage.run(p)
    words = Vocabulary.load(Path(p.paths.vocab) / "words.json")
    assert words.tokens.count("<unk>") == 1 and "@,@" in words and "@" not in words and "unk" not in words
    ids = np.load(Path(p.paths.encoded) / "text_val_word.npy").tolist()
    assert ids == [*words.encode(["the", "<unk>", "of", "1", "@,@", "000", "@-@", "odd", "<unk>", "."]), END_ID]
    assert ids.count(UNK_ID) == 2 and metrics["word_coverage"]["text"]["val"]["oov_rate"] == 0.2
