"""Use trained models: caption image files, draw attention overlays, generate text from a prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import ImageSkip, load_image
from pipeline.data.tokenize import tokenize
from pipeline.data.vocab import END_ID
from pipeline.decoding import beam_search, generate_text
from pipeline.training.modules import CaptioningModule, LanguageModelModule


@dataclass
class Caption:
    """One image's caption, its words and (show_attend_tell) attention per word (T, N)."""

    path: Path
    words: list[str]
    attention: torch.Tensor | None

    @property
    def text(self) -> str:
        return " ".join(self.words)


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
def caption_images(module: CaptioningModule, paths: list[Path], beam_size: int, alpha: float) -> list[Caption]:
    """Beam-search captions for image files."""
    images = torch.from_numpy(load_images(paths, int(module.hparams["image_size"]))).to(module.device)
    memory = module.model.encode(images)
    result = beam_search(module.model, memory, len(paths), beam_size, module.model_cfg.max_len, alpha)
    vocab = module.vocab_tokens
    attention = result.attention or [None] * len(paths)
    return [Caption(path, [vocab[t] for t in tokens], att)
            for path, tokens, att in zip(paths, result.tokens, attention, strict=True)]


def attention_strip(image: np.ndarray, words: list[str], attention: torch.Tensor, cell: int = 128) -> Image.Image:
    """The image, then one panel per word with its attention map over it (Xu et al. Fig. 2 style)."""
    from PIL import ImageDraw

    steps, n = attention.shape  # (T, N); T = words + 1 when the caption ended with <end>
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"attention over {n} positions is not a square grid")
    base = Image.fromarray(image.transpose(1, 2, 0)).resize((cell, cell), Image.Resampling.BICUBIC)
    labels = ["", *words, "<end>"][: steps + 1]
    strip = Image.new("RGB", (cell * len(labels), cell + 18), "white")
    strip.paste(base, (0, 0))
    for t in range(len(labels) - 1):
        alpha = attention[t].float().reshape(side, side).cpu().numpy()
        alpha = (alpha / max(alpha.max(), 1e-8) * 255).astype(np.uint8)
        mask = Image.fromarray(alpha).resize((cell, cell), Image.Resampling.BILINEAR)
        lit = Image.composite(base, Image.new("RGB", base.size, "black"), mask)
        strip.paste(Image.blend(base, lit, 0.8), (cell * (t + 1), 0))
    draw = ImageDraw.Draw(strip)
    for t, word in enumerate(labels):
        draw.text((cell * t + 4, cell + 3), word, fill="black")
    return strip


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
    return prompt + " " + " ".join("\n" if i == END_ID else vocab[i] for i in ids)


def caption_bytes(module: CaptioningModule, images: list[bytes | str], beam_size: int, alpha: float) -> list[str]:
    """Captions for encoded images given as bytes or base64 text (what a served model receives)."""
    import base64
    import tempfile

    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(images):
            raw = base64.b64decode(data) if isinstance(data, str) else bytes(data)
            path = Path(tmp) / f"image{i}"
            path.write_bytes(raw)
            paths.append(path)
        return [c.text for c in caption_images(module, paths, beam_size, alpha)]
