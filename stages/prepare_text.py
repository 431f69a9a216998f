"""Strip Project Gutenberg boilerplate, normalise the text corpora and split them into train/val/test.

DVC stage `prepare_text`: data.text.files (default: Python's documentation topics)
-> {paths.text}/{train,val,test}.txt (char stream) and .words.txt (one tokenised line per line)
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data import SPLITS
from pipeline.data.text import default_corpus, read_corpus, split_corpus, strip_boilerplate, word_lines
from pipeline.io import atomic_dir, write_metrics
from pipeline.params import Params, load_params
from stages import entry


def run(p: Params) -> dict:
    files = p.data.text.files
    docs, stripped = strip_boilerplate(read_corpus(files) if files else default_corpus())
    if not any(text.strip() for _, text in docs):
        raise ValueError(f"data.text.files: {files or 'pydoc_data.topics'}: no text found")
    splits = split_corpus(docs, p.prepare_text.split.val, p.prepare_text.split.test)
    for split in SPLITS:
        if not splits[split].strip():
            raise ValueError(f"prepare_text.split: the {split} split came out empty; "
                             "use more text or larger fractions")
    metrics: dict = {"source": list(files) or ["pydoc_data.topics"], "documents": len(docs),
                     "stripped": stripped, "characters": {}, "lines": {}, "words": {}}
    with atomic_dir(p.paths.text) as out:
        for split in SPLITS:
            text = splits[split]
            lines = word_lines(text, p.prepare_text.lowercase_words)
            (out / f"{split}.txt").write_text(text, encoding="utf-8")
            (out / f"{split}.words.txt").write_text(
                "".join(" ".join(toks) + "\n" for toks in lines), encoding="utf-8")
            metrics["characters"][split] = len(text)
            metrics["lines"][split] = len(lines)
            metrics["words"][split] = sum(len(t) for t in lines)
    write_metrics(Path(p.paths.metrics) / "prepare_text.json", metrics)
    note = (f" (Project Gutenberg header/footer: {stripped['characters']:,} characters stripped from "
            f"{stripped['documents']})" if stripped["documents"] else "")
    print(f"prepare_text: {len(docs):,} documents{note}; words train/val/test "
          f"{metrics['words']['train']:,}/{metrics['words']['val']:,}/{metrics['words']['test']:,}")
    return metrics


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
