"""Word tokenisation with NLTK, offline: no punkt download is needed with preserve_line=True."""

from __future__ import annotations

import re
import unicodedata

from nltk.tokenize import word_tokenize
from nltk.tokenize.treebank import TreebankWordDetokenizer

_DETOKENIZER = TreebankWordDetokenizer()

# A corpus's own atomic tokens, kept whole when they stand between spaces: markers such as WikiText's <unk>
# (lower-case letters in angle brackets) and WikiText's split number/hyphen joiners @-@, @,@, @.@.
# NLTK would otherwise split them into "<", "unk", ">" and "@", "-", "@".
ATOMIC = re.compile(r"(?<!\S)(?:<[a-z]+>|@[^\s@]@)(?!\S)")
_SLOT = "\ue000"  # a private-use character: normalise() has turned every one in the input into a space


def normalise(text: str) -> str:
    """NFC-normalise and turn control characters (other than newline and tab) into spaces."""
    text = unicodedata.normalize("NFC", text)
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" else " " for ch in text
    )


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split text into word tokens with NLTK's Treebank rules (sentence splitting off), ATOMIC tokens kept whole."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects str, got {type(text).__name__}")
    text = normalise(text)
    if lowercase:
        text = text.lower()
    atoms = iter(ATOMIC.findall(text))
    tokens = word_tokenize(ATOMIC.sub(_SLOT, text), preserve_line=True)
    return [next(atoms) if token == _SLOT else token for token in tokens]


def detokenize(tokens: list[str]) -> str:
    """Text from word tokens as a reader writes it ("a dog , on it ." -> "a dog, on it."); "\n" tokens end lines."""
    lines: list[list[str]] = [[]]
    for token in tokens:
        if token == "\n":
            lines.append([])
        else:
            lines[-1].append(token)
    return "\n".join(_DETOKENIZER.detokenize(line) for line in lines)
