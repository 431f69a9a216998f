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
