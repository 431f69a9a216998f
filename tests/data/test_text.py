"""Text corpora: default corpus, normalisation, deterministic contiguous splits, bad files."""

import pytest

from pipeline.data.text import (
    default_corpus,
    normalise_text,
    read_corpus,
    split_corpus,
    split_document,
    strip_boilerplate,
    strip_gutenberg,
    word_lines,
)

HEADER = "The Project Gutenberg EBook of A Tale, by Someone\n\nThis eBook is for the use of anyone.\n\n"
BOOK = "Chapter 1\n\nIt was a day.\nThe end.\n"
FOOTER = "\n\nEnd of the Project Gutenberg EBook of A Tale\n\nSection 1. General Terms of Use\n"


def test_default_corpus_is_real_english_prose():
    docs = default_corpus()
    assert len(docs) > 50
    text = " ".join(t for _, t in docs)
    assert len(text) > 100_000 and " the " in text


def test_normalise_text():
    raw = "Caf\u0065\u0301 one  \r\nline\x07two\t\n\n\n\n\nend   "
    out = normalise_text(raw)
    assert out == "Caf\u00e9 one\nline two\n\nend\n"
    assert normalise_text("   \n\n") == ""


def test_split_document_is_contiguous_and_complete():
    text = "".join(f"line {i}\n" for i in range(100))
    parts = split_document(text, val=0.1, test=0.05)
    assert parts["train"] + parts["val"] + parts["test"] == text
    assert parts["val"].splitlines()[0] == "line 85" and parts["test"].splitlines()[0] == "line 95"


def test_split_corpus_is_deterministic_and_disjoint():
    docs = [(f"d{i}", "".join(f"doc {i} line {j}\n" for j in range(40))) for i in range(3)]
    a, b = split_corpus(docs, 0.1, 0.1), split_corpus(docs, 0.1, 0.1)
    assert a == b
    lines = {s: set(a[s].splitlines()) - {""} for s in a}
    assert not (lines["train"] & lines["val"]) and not (lines["val"] & lines["test"])
    assert not (lines["train"] & lines["test"])
    assert len(lines["val"]) == len(lines["test"]) == 12


def test_read_corpus_names_bad_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ok".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        read_corpus([bad])
    with pytest.raises(FileNotFoundError, match="missing.txt: cannot read"):
        read_corpus([tmp_path / "missing.txt"])


def test_read_corpus_strips_bom(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhello".encode())
    assert read_corpus([f]) == [(str(f), "hello")]


def test_word_lines_tokenise_per_line():
    assert word_lines("Hello, World!\n\nIt's fine.\n", lowercase=True) == [
        ["hello", ",", "world", "!"], ["it", "'s", "fine", "."]]
    assert word_lines("Hello", lowercase=False) == [["Hello"]]


def test_word_lines_keep_wikitext_tokens():
    assert word_lines(" = Valkyria = \n\n The <unk> won 1 @,@ 000 @-@ odd . \n", lowercase=True) == [
        ["=", "valkyria", "="], ["the", "<unk>", "won", "1", "@,@", "000", "@-@", "odd", "."]]


@pytest.mark.parametrize(("start", "end"), [
    ("*** START OF THE PROJECT GUTENBERG EBOOK A TALE ***", "*** END OF THE PROJECT GUTENBERG EBOOK A TALE ***"),
    ("*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***", "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***"),
    ("***START OF THE PROJECT GUTENBERG EBOOK A TALE***", "***END OF THE PROJECT GUTENBERG EBOOK A TALE***"),
    ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*", "End of Project Gutenberg's A Tale"),
])
def test_strip_gutenberg_keeps_only_the_book(start, end):
    text = f"{HEADER}{start}\n\n{BOOK}\n{end}\n{FOOTER}"
    assert strip_gutenberg(text).strip() == BOOK.strip()


def test_strip_gutenberg_with_one_marker_or_none():
    end = "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\n"
    start = "*** START OF THE PROJECT GUTENBERG EBOOK A TALE ***\n"
    assert strip_gutenberg(BOOK + end + FOOTER) == BOOK  # the footer only (like anna_karenina.txt)
    assert strip_gutenberg(HEADER + start + BOOK) == BOOK
    assert strip_gutenberg(BOOK) == BOOK and strip_gutenberg("") == ""
    # a marker must start its line: prose that mentions one is kept
    prose = "He wrote: *** END OF THE PROJECT GUTENBERG EBOOK *** on the wall.\n"
    assert strip_gutenberg(prose + BOOK) == prose + BOOK
    # CRLF files too; the "End of the Project Gutenberg EBook" line above the end marker goes with the footer
    crlf = (HEADER + start + BOOK + "End of the Project Gutenberg EBook of A Tale\n" + end).replace("\n", "\r\n")
    assert strip_gutenberg(crlf) == BOOK.replace("\n", "\r\n")


def test_strip_boilerplate_counts_what_it_removed():
    end = "*** END OF THE PROJECT GUTENBERG EBOOK A TALE ***\n"
    docs = [("tale.txt", BOOK + end + FOOTER), ("plain.txt", BOOK)]
    kept, stripped = strip_boilerplate(docs)
    assert kept == [("tale.txt", BOOK), ("plain.txt", BOOK)]
    assert stripped == {"documents": 1, "characters": len(end + FOOTER)}
