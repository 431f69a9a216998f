"""What evaluate@<family> hands the report: the test captions it scored, or the language model's samples.

{paths.evaluation}/captioner/captions.json (+ attention_<image_index>.npy, float16 (T, N)) and
{paths.evaluation}/<language model>/samples.json. Written by stages/evaluate.py from pipeline/evaluation.py's own
decoding, read by the report; JSON and numpy only, so the report renders them without a model (or torch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_dir, read_json, save_npy, write_json
from pipeline.params import Params

CAPTIONS = "captions.json"
SAMPLES = "samples.json"


def examples_dir(p: Params, family: str) -> Path:
    """Where evaluate@<family> writes what the report shows of it."""
    return Path(p.paths.evaluation) / family


@dataclasses.dataclass
class CaptionExample:
    """One test image as evaluation captioned it: its row of the prepared split, words, references, attention."""

    image_index: int  # row of {paths.coco}/<split>/images.npy
    image_id: int
    file_name: str
    words: list[str]  # beam search's words (no <start>/<end>)
    references: list[str]  # as a reader writes them (detokenised)
    caption: str  # the words as a reader writes them
    attention: np.ndarray | None = None  # (T, N) float16 over the encoder's N positions; T = words (+1 for <end>)


@dataclasses.dataclass
class CaptionExamples:
    """The first test images of a captioner's evaluation, and how it decoded them."""

    arch: str
    attends: bool  # the model has per-word soft attention (whether or not any map was kept)
    decoding: dict[str, Any]  # beam_size, alpha, no_repeat_ngram, rerank_neighbours, ensemble_members: as scored
    images: list[CaptionExample]

    def save(self, folder: Path) -> None:
        """captions.json and one attention_<image_index>.npy per kept map, into an empty folder."""
        rows = []
        for ex in self.images:
            name = None
            if ex.attention is not None:
                name = f"attention_{ex.image_index}.npy"
                save_npy(folder / name, ex.attention.astype(np.float16))  # maps in [0, 1]: half precision is plenty
            row = {k: v for k, v in dataclasses.asdict(ex).items() if k != "attention"}
            rows.append({**row, "attention": name})
        write_json(folder / CAPTIONS, {"arch": self.arch, "attends": self.attends, **self.decoding, "images": rows})


@dataclasses.dataclass
class LanguageModelSamples:
    """Seeded samples of a language model: `prompt` continued for `length` tokens at each temperature."""

    prompt: str
    length: int
    seed: int
    samples: list[tuple[float, str]]  # (temperature, text including the prompt)

    def save(self, folder: Path) -> None:
        """samples.json into an empty folder."""
        write_json(folder / SAMPLES, {"prompt": self.prompt, "length": self.length, "seed": self.seed,
                                      "samples": [{"temperature": t, "text": text} for t, text in self.samples]})


Examples = CaptionExamples | LanguageModelSamples


def write_examples(folder: Path, examples: Examples) -> None:
    """Replace `folder` whole (no stale attention maps of an earlier run), atomically."""
    with atomic_dir(folder) as tmp:
        examples.save(tmp)


def read_caption_examples(folder: Path) -> CaptionExamples | None:
    """The captions evaluate@captioner wrote into `folder`; None when there are none; an error names a bad file."""
    path = folder / CAPTIONS
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        images = [_caption_example(folder, row) for row in data["images"]]
        decoding = {k: data[k] for k in ("beam_size", "alpha", "no_repeat_ngram")}
        decoding["rerank_neighbours"] = data.get("rerank_neighbours", 0)  # absent from files before reranking
        decoding["ensemble_members"] = data.get("ensemble_members", 1)  # absent from files before ensembles
        return CaptionExamples(str(data["arch"]), bool(data["attends"]), decoding, images)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a captions file of evaluate@captioner ({type(err).__name__}: {err})") from None


def _caption_example(folder: Path, row: dict[str, Any]) -> CaptionExample:
    """One image's record, with its attention map loaded (and checked) when it has one."""
    attention = None
    if row["attention"] is not None:
        path = folder / row["attention"]
        attention = np.load(path, allow_pickle=False)  # (T, N)
        if attention.ndim != 2 or attention.shape[0] < len(row["words"]):
            raise ValueError(f"{path}: expected attention (T >= {len(row['words'])} words, N), got {attention.shape}")
    return CaptionExample(int(row["image_index"]), int(row["image_id"]), str(row["file_name"]), list(row["words"]),
                          list(row["references"]), str(row["caption"]), attention)


def read_samples(folder: Path) -> LanguageModelSamples | None:
    """The samples evaluate@<language model> wrote into `folder`; None when there are none."""
    path = folder / SAMPLES
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        samples = [(float(s["temperature"]), str(s["text"])) for s in data["samples"]]
        return LanguageModelSamples(str(data["prompt"]), int(data["length"]), int(data["seed"]), samples)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a samples file of evaluate@<language model> ({type(err).__name__}: {err})") \
            from None
