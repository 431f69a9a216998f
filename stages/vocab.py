"""Build the word and character vocabularies and encode the prepared data to token ids.

DVC stage `vocab`: {paths.coco}/*/captions.jsonl, {paths.text}/*
-> {paths.vocab}/{words,chars}.json, {paths.encoded}/{text,captions}_<split>_<level>.npy
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.data import SPLITS
from pipeline.data.coco import read_captions
from pipeline.data.vocab import Vocabulary, coverage
from pipeline.io import atomic_dir, save_npy, write_json
from pipeline.params import Params, load_params
from stages import entry


def caption_lines(coco_dir: Path, split: str) -> list[list[str]]:
    """All tokenised captions of one prepared COCO split, in file order."""
    return [caption for record in read_captions(coco_dir / split / "captions.jsonl") for caption in record["captions"]]


def text_word_lines(text_dir: Path, split: str) -> list[list[str]]:
    """Tokenised lines of one prepared text split."""
    return [line.split() for line in (text_dir / f"{split}.words.txt").read_text("utf-8").splitlines()]


def run(p: Params) -> dict:
    coco, text = Path(p.paths.coco), Path(p.paths.text)
    words = {"captions": {s: caption_lines(coco, s) for s in SPLITS},
             "text": {s: text_word_lines(text, s) for s in SPLITS}}
    chars = {s: (text / f"{s}.txt").read_text("utf-8") for s in SPLITS}

    word_counts = Counter(t for src in p.vocab.sources for line in words[src]["train"] for t in line)
    word_vocab = Vocabulary.build(word_counts, p.vocab.min_freq, p.vocab.max_size, "word")
    char_vocab = Vocabulary.build(Counter(chars["train"]), p.vocab.char_min_freq, 100_000, "char")

    # one block: neither folder is renamed into place unless both were written whole (the ids match the words)
    with atomic_dir(p.paths.vocab) as vocab_out, atomic_dir(p.paths.encoded) as out:
        word_vocab.save(vocab_out / "words.json")
        char_vocab.save(vocab_out / "chars.json")
        for split in SPLITS:
            for src in ("captions", "text"):
                save_npy(out / f"{src}_{split}_word.npy", word_vocab.encode_stream(words[src][split]))
            save_npy(out / f"text_{split}_char.npy", char_vocab.encode_stream([chars[split]])[:-1])

    metrics = {
        "words": len(word_vocab), "chars": len(char_vocab),
        "sources": list(p.vocab.sources), "min_freq": p.vocab.min_freq, "max_size": p.vocab.max_size,
        "word_coverage": {src: {s: coverage(word_vocab, (t for line in words[src][s] for t in line))
                                for s in SPLITS} for src in ("captions", "text")},
        "char_coverage": {s: coverage(char_vocab, chars[s]) for s in SPLITS},
    }
    write_json(Path(p.paths.metrics) / "vocab.json", metrics)
    oov = metrics["word_coverage"]
    print(f"vocab: {len(word_vocab):,} words, {len(char_vocab):,} chars; val OOV rate "
          f"captions {oov['captions']['val']['oov_rate']:.2%}, text {oov['text']['val']['oov_rate']:.2%}")
    return metrics


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
