"""Stage vocab: vocabularies from prepared captions + text, encoded id streams, coverage metrics."""

import json
from pathlib import Path

import numpy as np

from pipeline.data.vocab import END_ID, UNK_ID, Vocabulary
from pipeline.params import load_params
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
