"""Vocabulary: specials fixed, frequency cut, round trips, JSON persistence and bad files."""

import json
from collections import Counter

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary, coverage
from pipeline.tokens import END_ID, PAD_ID, SPECIALS, START_ID, UNK_ID


def make_vocab(min_freq=2, max_size=100) -> Vocabulary:
    counts = Counter("a a a b b c the the the the dog".split())
    return Vocabulary.build(counts, min_freq=min_freq, max_size=max_size)


def test_specials_come_first_with_fixed_ids():
    vocab = make_vocab()
    assert vocab.tokens[:4] == list(SPECIALS)
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)


def test_min_freq_and_order():
    vocab = make_vocab(min_freq=2)
    assert vocab.tokens[4:] == ["the", "a", "b"]  # by count, then alphabetical
    assert "c" not in vocab and "dog" not in vocab


def test_max_size_counts_specials():
    vocab = make_vocab(min_freq=1, max_size=6)
    assert len(vocab) == 6 and vocab.tokens[4:] == ["the", "a"]


def test_encode_decode_round_trip():
    vocab = make_vocab(min_freq=1)
    tokens = ["the", "dog", "a", "c"]
    ids = vocab.encode(tokens, add_start=True, add_end=True)
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert vocab.decode(ids) == tokens
    assert vocab.decode([*ids, PAD_ID, PAD_ID]) == tokens


def test_unknown_words_map_to_unk():
    vocab = make_vocab(min_freq=2)
    assert vocab.encode(["the", "zebra"]) == [vocab.index["the"], UNK_ID]
    assert vocab.decode(vocab.encode(["zebra"])) == ["<unk>"]


def test_encode_stream_ends_lines():
    vocab = make_vocab(min_freq=1)
    ids = vocab.encode_stream([["a", "b"], ["the"]])
    assert ids.dtype == np.int32
    assert ids.tolist() == [vocab.index["a"], vocab.index["b"], END_ID, vocab.index["the"], END_ID]


def test_json_round_trip_is_not_pickle(tmp_path):
    vocab = make_vocab()
    path = tmp_path / "words.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert data["tokens"] == vocab.tokens and data["specials"]["<pad>"] == 0
    loaded = Vocabulary.load(path)
    assert loaded.tokens == vocab.tokens and loaded.counts == vocab.counts


def test_bad_vocab_files_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": ["a", "b"]}')
    with pytest.raises(ValueError, match="bad.json: vocabulary must start with"):
        Vocabulary.load(bad)
    bad.write_text('{"tokens": ["<pad>", "<start>", "<end>", "<unk>", 5]}')
    with pytest.raises(ValueError, match="bad.json: field 'tokens' must hold only strings"):
        Vocabulary.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid UTF-8 JSON"):
        Vocabulary.load(bad)


def test_coverage_counts_running_tokens():
    vocab = make_vocab(min_freq=2)
    cov = coverage(vocab, ["the", "the", "zebra", "a"])
    assert cov["tokens"] == 4 and cov["types"] == 3
    assert cov["oov_rate"] == pytest.approx(0.25)
    assert cov["type_coverage"] == pytest.approx(2 / 3)


def test_a_corpus_s_own_unk_is_the_vocabulary_s_unk():
    counts = Counter("the <unk> the <unk> <unk> cat".split())  # WikiText's <unk>, kept whole by tokenize
    vocab = Vocabulary.build(counts, min_freq=1, max_size=100)
    assert vocab.tokens == [*SPECIALS, "the", "cat"] and "<unk>" not in vocab.counts
    assert vocab.encode(["the", "<unk>", "cat"]) == [vocab.index["the"], UNK_ID, vocab.index["cat"]]
    assert vocab.encode_stream([["<unk>"]]).tolist() == [UNK_ID, END_ID]
    cov = coverage(vocab, ["the", "<unk>", "<unk>", "cat"])
    assert cov["oov_rate"] == pytest.approx(0.5) and cov["type_coverage"] == pytest.approx(2 / 3)


def test_other_specials_in_the_data_are_unknown_words():
    vocab = make_vocab(min_freq=1)
    # a literal "<end>" in a text must not end its line, nor "<pad>"/"<start>" look like padding or a start
    assert vocab.encode(["a", "<end>", "<pad>", "<start>"]) == [vocab.index["a"], UNK_ID, UNK_ID, UNK_ID]
    assert vocab.encode_stream([["<end>", "a"]]).tolist() == [UNK_ID, vocab.index["a"], END_ID]
    assert vocab.encode(["a"], add_start=True, add_end=True) == [START_ID, vocab.index["a"], END_ID]
    assert coverage(vocab, ["<end>", "a"])["oov_rate"] == pytest.approx(0.5)
