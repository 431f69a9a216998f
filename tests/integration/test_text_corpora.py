"""The real text corpora from ../shared/data/text: Gutenberg boilerplate stripped, WikiText's tokens kept whole."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.data.text import read_corpus, split_corpus, strip_boilerplate, word_lines

pytestmark = pytest.mark.shared_data


def test_anna_karenina_loses_its_licence_footer_and_nothing_else(shared_data):
    path = shared_data / "text" / "anna_karenina.txt"
    docs = read_corpus([path])
    kept, stripped = strip_boilerplate(docs)
    lines = kept[0][1].splitlines()
    assert len(lines) == 39_888  # SOURCES.md: the footer starts at line 39,889 ("*** END OF THIS PROJECT ...")
    assert lines[0] == "Chapter 1" and lines[:39_888] == docs[0][1].splitlines()[:39_888]
    assert stripped["documents"] == 1 and 0.005 < stripped["characters"] / len(docs[0][1]) < 0.02
    assert "Gutenberg" not in split_corpus(kept, 0.05, 0.05)["test"]


def test_wikitext_keeps_its_own_tokens(shared_data):
    docs = read_corpus([shared_data / "text" / "wikitext-2" / "valid.txt"])
    kept, stripped = strip_boilerplate(docs)
    assert stripped == {"documents": 0, "characters": 0}
    text = kept[0][1]
    counts = Counter(t for line in word_lines(text, lowercase=False) for t in line)
    raw = Counter(text.split())
    for token in ("<unk>", "@-@", "@,@", "@.@"):
        assert counts[token] == raw[token] > 0
    assert counts["unk"] == counts["@"] == 0
    # WikiText is tokenised already: NLTK changes the count by well under 0.1% (e.g. '"' -> `` and '')
    assert abs(sum(counts.values()) - sum(raw.values())) < 0.001 * sum(raw.values())
