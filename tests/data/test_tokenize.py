"""Word tokens back to text as a reader writes it (what `caption`, serving, the report and `generate` show)."""

from __future__ import annotations

from pipeline.data.tokenize import detokenize, tokenize


def test_no_space_before_punctuation_nor_inside_brackets_and_quotes():
    assert detokenize(["a", "dog", ",", "on", "a", "table", "."]) == "a dog, on a table."
    assert detokenize(["a", "(", "small", ")", "cat", "'s", "bowl", "!"]) == "a (small) cat's bowl!"
    assert detokenize(["he", "said", "``", "hi", "''", "."]) == 'he said "hi".'


def test_newline_tokens_end_lines_and_tokenising_the_text_gives_the_tokens_back():
    tokens = ["the", "end", ".", "\n", "next", "line", ",", "too", "."]
    text = detokenize(tokens)
    assert text == "the end.\nnext line, too."
    assert [t for line in text.splitlines() for t in tokenize(line)] == [t for t in tokens if t != "\n"]
    assert detokenize([]) == ""


def test_a_corpus_s_atomic_tokens_stay_whole():
    # WikiText's own tokens: NLTK alone gives "<", "unk", ">" and "@", "-", "@"
    line = " The <unk> of 1 @,@ 000 @-@ year @.@ 5 <unk> "
    words = ["the", "<unk>", "of", "1", "@,@", "000", "@-@", "year", "@.@", "5", "<unk>"]
    assert tokenize(line) == words
    assert tokenize(line, lowercase=False) == ["The", *words[1:]]
    assert tokenize("<UNK> here") == ["<unk>", "here"]  # lower-cased first, then kept whole
    assert tokenize("<unk>") == ["<unk>"] and tokenize("a <eos>") == ["a", "<eos>"]


def test_atomic_tokens_only_between_spaces_and_the_rest_tokenised_as_before():
    assert tokenize("x<unk> and a@-@b.") == ["x", "<", "unk", ">", "and", "a", "@", "-", "@", "b", "."]
    assert tokenize('"<unk>" said Mr. <unk>') == ["``", "<", "unk", ">", "''", "said", "mr.", "<unk>"]
    assert tokenize("It's <unk>, isn't it?") == ["it", "'s", "<", "unk", ">", ",", "is", "n't", "it", "?"]
    assert tokenize("it 's <unk> , is n't it ?") == ["it", "'s", "<unk>", ",", "is", "n't", "it", "?"]


def test_detokenize_keeps_atomic_tokens():
    tokens = tokenize("a <unk> of 1 @,@ 000 @-@ year .")
    text = detokenize(tokens)
    assert text == "a <unk> of 1 @,@ 000 @-@ year."
    assert tokenize(text) == tokens
