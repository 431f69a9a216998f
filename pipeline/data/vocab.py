"""Vocabularies: token <-> id maps with fixed special tokens, saved as JSON (never pickle)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.io import read_json, write_json
from pipeline.tokens import END_ID, PAD_ID, SPECIALS, START_ID, UNK_ID


class Vocabulary:
    """An ordered token list; ids are positions, the four specials come first."""

    def __init__(self, tokens: Sequence[str], counts: dict[str, int] | None = None,
                 level: str = "word", min_freq: int = 1, max_size: int | None = None):
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(tokens[:4])}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.tokens = list(tokens)
        self.index = {tok: i for i, tok in enumerate(self.tokens)}
        self.counts = dict(counts or {})
        self.level = level
        self.min_freq = min_freq
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def id_of(self, token: str) -> int:
        """The id of a token read from data: unknown words, and the specials other than <unk>, are <unk>.

        A corpus's own <unk> (WikiText's) thus is the vocabulary's <unk>, and a literal "<end>" in a text
        never ends a line early.
        """
        i = self.index.get(token, UNK_ID)
        return UNK_ID if i < UNK_ID else i

    @classmethod
    def build(cls, counts: Counter[str], min_freq: int, max_size: int, level: str = "word") -> Vocabulary:
        """Keep tokens seen >= min_freq times, most frequent first (ties alphabetical), up to max_size."""
        kept = sorted((t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *kept], {t: counts[t] for t in kept}, level, min_freq, max_size)

    def encode(self, tokens: Iterable[str], add_start: bool = False, add_end: bool = False) -> list[int]:
        """Token ids (id_of: unknown tokens -> <unk>); optionally wrapped in <start> ... <end>."""
        ids = [self.id_of(t) for t in tokens]
        return ([START_ID] if add_start else []) + ids + ([END_ID] if add_end else [])

    def decode(self, ids: Iterable[int], strip_specials: bool = True) -> list[str]:
        """Tokens for ids; stops at <end> and drops <pad>/<start> when strip_specials."""
        out = []
        for i in ids:
            i = int(i)
            if strip_specials:
                if i == END_ID:
                    break
                if i in (PAD_ID, START_ID):
                    continue
            out.append(self.tokens[i])
        return out

    def encode_stream(self, lines: Iterable[Sequence[str]]) -> np.ndarray:
        """One flat int32 array of all lines, each followed by <end> (the LM's end-of-line marker)."""
        ids: list[int] = []
        for line in lines:
            ids.extend(self.id_of(t) for t in line)
            ids.append(END_ID)
        return np.asarray(ids, dtype=np.int32)

    def to_json(self) -> dict:
        return {"level": self.level, "tokens": self.tokens,
                "specials": {tok: i for i, tok in enumerate(SPECIALS)},
                "counts": self.counts, "min_freq": self.min_freq, "max_size": self.max_size}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load a vocabulary JSON, naming the file and field when it is malformed."""
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ValueError(f"{path}: expected an object with a 'tokens' list")
        if not all(isinstance(t, str) for t in data["tokens"]):
            raise ValueError(f"{path}: field 'tokens' must hold only strings")
        try:
            return cls(data["tokens"], data.get("counts"), data.get("level", "word"),
                       data.get("min_freq", 1), data.get("max_size"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def coverage(vocab: Vocabulary, tokens: Iterable[str]) -> dict[str, float | int]:
    """Token count, OOV rate (share of running tokens that become <unk>, a corpus's own too) and type coverage."""
    counts = Counter(tokens)
    total = sum(counts.values())
    known = {t for t in counts if vocab.id_of(t) != UNK_ID}
    oov = sum(c for t, c in counts.items() if t not in known)
    types_known = len(known)
    return {"tokens": total, "types": len(counts),
            "oov_rate": oov / total if total else 0.0,
            "type_coverage": types_known / len(counts) if counts else 1.0}
