"""Text corpora for language models: read, normalise, split into train/val/test, tokenise to words."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.data import SPLITS
from pipeline.data.tokenize import normalise, tokenize

# Project Gutenberg's marker lines. The book is what lies after the last start marker ("*** START OF THE/THIS
# PROJECT GUTENBERG EBOOK ...", or the 1990s "*END*THE SMALL PRINT! ...") and before the first end marker
# ("*** END OF THE/THIS PROJECT GUTENBERG EBOOK ...", or the "End of (the) Project Gutenberg's ..." line above it).
GUTENBERG_START = re.compile(r"\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I)
GUTENBERG_END = re.compile(r"\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG)", re.I)


def default_corpus() -> list[tuple[str, str]]:
    """Python's documentation topics (shipped with every CPython): (name, text) sorted by name."""
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics/{name}", topics[name]) for name in sorted(topics)]


def read_corpus(files: Iterable[str | Path]) -> list[tuple[str, str]]:
    """Read UTF-8 text files; an unreadable or non-UTF-8 file is an error naming it and the offset."""
    docs = []
    for f in files:
        path = Path(f)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"data.text.files: {path}: cannot read ({err.strerror})") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"data.text.files: {path}: not valid UTF-8 at byte {err.start} "
                f"({raw[err.start:err.start + 4]!r}); convert it with iconv"
            ) from None
        docs.append((str(path), text))
    return docs


def strip_gutenberg(text: str) -> str:
    """The book inside Project Gutenberg's header and licence footer; text without marker lines comes back whole."""
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if GUTENBERG_END.match(line)), len(lines))
    start = max((i + 1 for i, line in enumerate(lines[:end]) if GUTENBERG_START.match(line)), default=0)
    return "".join(lines[start:end])


def strip_boilerplate(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """strip_gutenberg on every document, with how many documents lost how many characters."""
    kept = [(name, strip_gutenberg(text)) for name, text in docs]
    lost = [len(text) - len(body) for (_, text), (_, body) in zip(docs, kept, strict=True)]
    return kept, {"documents": sum(1 for n in lost if n), "characters": sum(lost)}


def normalise_text(text: str) -> str:
    """NFC, LF newlines, no control characters, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = normalise(text).replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n" if text else ""


def split_document(text: str, val: float, test: float) -> dict[str, str]:
    """Split one document into contiguous train/val/test blocks at line boundaries (test at the end)."""
    lines = text.splitlines(keepends=True)
    n = len(lines)
    n_test = round(n * test)
    n_val = round(n * val)
    n_train = n - n_val - n_test
    return {
        "train": "".join(lines[:n_train]),
        "val": "".join(lines[n_train:n_train + n_val]),
        "test": "".join(lines[n_train + n_val:]),
    }


def split_corpus(docs: list[tuple[str, str]], val: float, test: float) -> dict[str, str]:
    """Normalise and split every document, then join each split in document order."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for _, text in docs:
        for split, block in split_document(normalise_text(text), val, test).items():
            if block.strip():
                parts[split].append(block)
    return {split: "\n".join(blocks) for split, blocks in parts.items()}


def word_lines(text: str, lowercase: bool) -> list[list[str]]:
    """NLTK word tokens per non-empty line (the word-level stream; lines end with <end> later)."""
    return [tokenize(line, lowercase=lowercase) for line in text.splitlines() if line.strip()]
