"""Use trained models: caption image files, draw attention overlays, generate text from a prompt."""

from __future__ import annotations

import base64
import binascii
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.baselines import nearest_images, pooled_features
from pipeline.data.images import ImageLimits, ImageSkip, load_image
from pipeline.data.tokenize import detokenize, tokenize
from pipeline.decoding import Hypothesis, beam_search, generate_text
from pipeline.rerank import Neighbours, rerank
from pipeline.tokens import END_ID
from pipeline.training.modules import CaptioningModule, LanguageModelModule


@dataclass
class Caption:
    """One image's caption, its words and (show_attend_tell) attention per word (T, N)."""

    path: Path
    words: list[str]
    attention: torch.Tensor | None

    @property
    def text(self) -> str:
        return detokenize(self.words)


def load_images(paths: list[Path], size: int) -> np.ndarray:
    """(B, 3, S, S) uint8, prepared exactly like prepare_coco; a bad file is an error naming it."""
    arrays = []
    for path in paths:
        try:
            arrays.append(load_image(path, size))
        except ImageSkip as err:
            raise ValueError(f"{path}: cannot use this image ({err.reason}: {err})") from None
    return np.stack(arrays)


@torch.no_grad()
def caption_array(module: CaptioningModule, images: np.ndarray, beam_size: int, alpha: float, *,
                  no_repeat_ngram: int = 0, model: nn.Module | None = None,
                  neighbours: Neighbours | None = None) -> list[tuple[list[str], torch.Tensor | None]]:
    """Beam-search captions of prepared images (B, 3, S, S) uint8: each caption's words and attention.

    no_repeat_ngram: the n-gram block of beam_search (evaluate.no_repeat_ngram; 0: off). model: what decodes
    (default the module's own; e.g. a CaptionerEnsemble of it). neighbours: keep, of the beam's finished
    captions, the one the nearest training images agree with (what evaluate@captioner scores with
    evaluate.rerank_neighbours); images are matched on the module's own encoder, as in evaluation.
    """
    model = model if model is not None else module.model
    batch = torch.from_numpy(images).to(module.device)
    memory = model.encode(batch)
    result = beam_search(model, memory, len(images), beam_size, module.model_cfg.max_len, alpha,
                         no_repeat_ngram, n_best=neighbours is not None)
    attention = result.attention or [None] * len(images)
    best = [Hypothesis(*h) for h in zip(result.tokens, result.scores, attention, strict=True)]
    if neighbours is not None:
        best = _reranked(module, batch, result.candidates or [[h] for h in best], neighbours)
    vocab = module.vocab_tokens
    return [([vocab[t] for t in h.tokens], h.attention) for h in best]


def _reranked(module: CaptioningModule, batch: Tensor, candidates: list[list[Hypothesis]],
              neighbours: Neighbours) -> list[Hypothesis]:
    """Per image (B, 3, S, S), the candidate of highest consensus among its neighbours.k nearest training images."""
    indices = torch.arange(len(batch))
    queries = pooled_features(module.model.encoder, [{"images": batch, "image_index": indices}], module.device)
    nearest = nearest_images(neighbours.train, queries, neighbours.k)
    vocab = module.vocab_tokens
    options = {i: [(" ".join(vocab[t] for t in h.tokens), h.score) for h in hyps] for i, hyps in enumerate(candidates)}
    chosen = rerank(options, nearest, neighbours.cider, neighbours.weight)
    return [hyps[chosen[i]] for i, hyps in enumerate(candidates)]


def caption_images(module: CaptioningModule, paths: list[Path], beam_size: int, alpha: float, *,
                   no_repeat_ngram: int = 0, model: nn.Module | None = None,
                   neighbours: Neighbours | None = None) -> list[Caption]:
    """Beam-search captions for image files (a bad file is an error naming it); model, neighbours: caption_array's."""
    images = load_images(paths, int(module.hparams["image_size"]))
    captions = caption_array(module, images, beam_size, alpha, no_repeat_ngram=no_repeat_ngram, model=model,
                             neighbours=neighbours)
    return [Caption(path, words, att) for path, (words, att) in zip(paths, captions, strict=True)]


def caption_files(module: CaptioningModule, paths: list[Path], beam_size: int, alpha: float, *,
                  no_repeat_ngram: int = 0, model: nn.Module | None = None,
                  neighbours: Neighbours | None = None) -> tuple[list[Caption], list[str]]:
    """Captions of the usable files among `paths`, and one message per file that could not be used."""
    good, bad = [], []
    for path in paths:
        try:
            load_images([path], int(module.hparams["image_size"]))
            good.append(path)
        except ValueError as err:
            bad.append(str(err))
    if not good:
        return [], bad
    return caption_images(module, good, beam_size, alpha, no_repeat_ngram=no_repeat_ngram, model=model,
                          neighbours=neighbours), bad


def prompt_ids(module: LanguageModelModule, prompt: str) -> list[int]:
    """Encode a prompt the way the model's training text was encoded (chars, or NLTK words)."""
    units = list(prompt) if module.model_cfg.level == "char" else tokenize(prompt, lowercase=True)
    return module.vocab.encode(units) or [END_ID]


def generate(module: LanguageModelModule, prompt: str, length: int, temperature: float,
             top_k: int | None = None, seed: int = 0) -> str:
    """The prompt followed by `length` sampled tokens, as text."""
    generator = torch.Generator(device=module.device).manual_seed(seed)
    ids = generate_text(module.model, prompt_ids(module, prompt), length, temperature, top_k, generator)
    vocab = module.vocab_tokens
    if module.model_cfg.level == "char":
        return prompt + "".join("\n" if i == END_ID else vocab[i] for i in ids)
    return prompt + " " + detokenize(["\n" if i == END_ID else vocab[i] for i in ids])


class BadRecord(ValueError):
    """A record of a request that cannot be used; the message names the record (0-based) and the problem."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"record {index}: {problem}")
        self.index, self.problem = index, problem


class BadRecords(ValueError):
    """Every bad record of a request, one message: "record 1: ...; record 3: ..."."""

    def __init__(self, bad: list[BadRecord]) -> None:
        super().__init__("; ".join(str(b) for b in bad))
        self.bad = bad


def record_bytes(index: int, value: object, column: str) -> bytes:
    """The encoded image of one record: bytes as given, text as base64 (whitespace allowed, nothing else)."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, str):
        try:  # validate: b64decode would otherwise drop every non-alphabet character and decode the rest
            raw = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadRecord(index, f"'{column}' is not valid base64") from None
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadRecord(index, f"no '{column}' (send {{\"{column}\": \"<base64 of an image file>\"}})")
    else:
        raise BadRecord(index, f"'{column}' must be base64 text, not {type(value).__name__}")
    if not raw:
        raise BadRecord(index, f"'{column}' is empty")
    return raw


def caption_bytes(module: CaptioningModule, images: list[object], beam_size: int, alpha: float,
                  max_pixels: int | None = None, column: str = "image", *, no_repeat_ngram: int = 0,
                  model: nn.Module | None = None, neighbours: Neighbours | None = None) -> list[str]:
    """Captions for encoded images given as bytes or base64 text (what a served model receives).

    Images are decoded one at a time and shrunk at once, so memory holds one full-size image; an image
    of more than max_pixels (width x height, from its header) is refused before any pixel is decoded.
    Bad records raise BadRecords naming each of them; nothing is captioned then. no_repeat_ngram, model and
    neighbours (caption_array's) are keyword-only with the old behaviour by default: a model registered before
    them runs its own older served_model.py, which never passes them.
    """
    size = int(module.hparams["image_size"])
    limits = ImageLimits(max_bytes=None, max_pixels=max_pixels)
    arrays, bad = [], []
    with tempfile.TemporaryDirectory(prefix="capline-records-") as tmp:
        path = Path(tmp) / "record"  # decoded as prepare_coco decodes files (one file, rewritten per record)
        for i, value in enumerate(images):
            try:
                path.write_bytes(record_bytes(i, value, column))
                arrays.append(load_image(path, size, limits))
            except BadRecord as err:
                bad.append(err)
            except ImageSkip as err:
                message = str(err).replace(str(path), "<record>")  # never show a server path
                bad.append(BadRecord(i, f"'{column}' cannot be used ({err.reason}: {message})"))
    if bad:
        raise BadRecords(bad)
    if not arrays:
        return []
    captions = caption_array(module, np.stack(arrays), beam_size, alpha, no_repeat_ngram=no_repeat_ngram,
                             model=model, neighbours=neighbours)
    return [detokenize(words) for words, _ in captions]
