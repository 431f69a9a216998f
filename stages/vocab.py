"""Build the word and character vocabularies and encode the prepared data to token ids.

DVC stage `vocab`: {paths.text}/* and, when vocab.sources holds captions, {paths.coco}/*/captions.jsonl
-> {paths.vocab}/{words,chars}.json, {paths.encoded}/text_<split>_{word,char}.npy and, with captions as a
source, captions_<split>_word.npy (the embeddings stage reads the streams of vocab.sources, nothing else does)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.data import SPLITS
from pipeline.data.coco import read_captions
from pipeline.data.vocab import Vocabulary, coverage
from pipeline.io import atomic_dir, save_npy, write_metrics
from pipeline.params import Params, load_params
from stages import entry

# why each input is read, and the stage that writes it
NEEDS = {"captions": ("vocab.sources holds captions; drop it for a text-only vocabulary", "prepare_coco"),
         "text": ("the char vocabulary and the language models' streams come from the text", "prepare_text")}


def need(path: Path, source: str) -> Path:
    """path, or FileNotFoundError naming it, why it is read and the stage that writes it."""
    if not path.is_file():
        why, stage = NEEDS[source]
        raise FileNotFoundError(f"{path}: not found ({why}); run the {stage} stage first: dvc repro {stage}")
    return path


def caption_lines(coco_dir: Path, split: str) -> list[list[str]]:
    """All tokenised captions of one prepared COCO split, in file order."""
    path = need(coco_dir / split / "captions.jsonl", "captions")
    return [caption for record in read_captions(path) for caption in record["captions"]]


def text_word_lines(text_dir: Path, split: str) -> list[list[str]]:
    """Tokenised lines of one prepared text split."""
    return [line.split() for line in need(text_dir / f"{split}.words.txt", "text").read_text("utf-8").splitlines()]


def read_sources(p: Params) -> dict[str, dict[str, list[list[str]]]]:
    """Word lines per source and split: the text always (the language models' streams), captions only as a source."""
    coco, text = Path(p.paths.coco), Path(p.paths.text)
    words = {"text": {s: text_word_lines(text, s) for s in SPLITS}}
    if "captions" in p.vocab.sources:
        words["captions"] = {s: caption_lines(coco, s) for s in SPLITS}
    return words


def run(p: Params) -> dict:
    text = Path(p.paths.text)
    words = read_sources(p)
    chars = {s: need(text / f"{s}.txt", "text").read_text("utf-8") for s in SPLITS}

    word_counts = Counter(t for src in p.vocab.sources for line in words[src]["train"] for t in line)
    word_vocab = Vocabulary.build(word_counts, p.vocab.min_freq, p.vocab.max_size, "word")
    char_vocab = Vocabulary.build(Counter(chars["train"]), p.vocab.char_min_freq, 100_000, "char")

    # one block: neither folder is renamed into place unless both were written whole (the ids match the words)
    with atomic_dir(p.paths.vocab) as vocab_out, atomic_dir(p.paths.encoded) as out:
        word_vocab.save(vocab_out / "words.json")
        char_vocab.save(vocab_out / "chars.json")
        for split in SPLITS:
            for src in words:
                save_npy(out / f"{src}_{split}_word.npy", word_vocab.encode_stream(words[src][split]))
            save_npy(out / f"text_{split}_char.npy", char_vocab.encode_stream([chars[split]])[:-1])

    metrics = {
        "words": len(word_vocab), "chars": len(char_vocab),
        "sources": list(p.vocab.sources), "min_freq": p.vocab.min_freq, "max_size": p.vocab.max_size,
        "word_coverage": {src: {s: coverage(word_vocab, (t for line in words[src][s] for t in line))
                                for s in SPLITS} for src in sorted(words)},
        "char_coverage": {s: coverage(char_vocab, chars[s]) for s in SPLITS},
    }
    write_metrics(Path(p.paths.metrics) / "vocab.json", metrics)
    oov = ", ".join(f"{src} {cov['val']['oov_rate']:.2%}" for src, cov in metrics["word_coverage"].items())
    print(f"vocab: {len(word_vocab):,} words, {len(char_vocab):,} chars; val OOV rate {oov}")
    return metrics


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
