"""Consensus reranking (Devlin et al. 2015): the captioner proposes, the nearest training images vote.

Beam search finishes several captions per image. Of those, keep the one whose mean CIDEr-D against the
reference captions of the image's `k` nearest training images (`baselines.nearest_images`: cosine on the
captioner's own pooled encoder features) is highest, plus `weight` times its length-normalised log-probability.
The output is always one of the model's own captions: the neighbours only choose among them, so nothing is
copied from the training set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.io import atomic_open
from pipeline.training.scst import CiderD

Candidates = Sequence[tuple[str, float]]  # (caption, beam score), best first
NEIGHBOUR_ARRAYS = ("features", "keys", "captions", "caption_keys")  # what a saved Neighbours file holds


@dataclass
class Neighbours:
    """What reranking the captions of any image needs: the training images' pooled encoder features
    (image_index list, (N, C) L2-normalised), a CIDEr-D over their reference captions, how many of the nearest
    vote, and the beam score's weight."""

    train: tuple[list[int], Tensor]
    cider: CiderD
    k: int
    weight: float = 0.0


def save_neighbours(neighbours: Neighbours, path: str | Path) -> None:
    """The training features and captions as plain arrays (.npz, no pickle), written atomically."""
    keys, features = neighbours.train
    refs = neighbours.cider.references
    caption_keys = [key for key in keys for _ in refs[key]]
    with atomic_open(path, "wb") as out:
        np.savez(out, features=features.float().numpy(), keys=np.asarray(keys, dtype=np.int64),
                 captions=np.asarray([c for key in keys for c in refs[key]], dtype=np.str_),
                 caption_keys=np.asarray(caption_keys, dtype=np.int64))


def load_neighbours(path: str | Path, k: int, weight: float) -> Neighbours:
    """A saved Neighbours file (never unpickled); ValueError naming the file and what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in NEIGHBOUR_ARRAYS}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a reranking neighbours file ({type(err).__name__}: {err})") from None
    features, keys = arrays["features"], arrays["keys"]
    if features.ndim != 2 or keys.shape != (len(features),) or arrays["captions"].shape != arrays["caption_keys"].shape:
        raise ValueError(f"{path}: expected features (N, C), keys (N,) and one image key per caption, got shapes "
                         f"{features.shape}, {keys.shape}, {arrays['captions'].shape}, {arrays['caption_keys'].shape}")
    refs: dict[int, list[str]] = {int(key): [] for key in keys}
    for key, caption in zip(arrays["caption_keys"].tolist(), arrays["captions"].tolist(), strict=True):
        if key not in refs:
            raise ValueError(f"{path}: caption {caption!r} belongs to image {key}, which has no features")
        refs[key].append(caption)
    return Neighbours((keys.tolist(), torch.from_numpy(features.astype(np.float32))), CiderD(refs), k, weight)


def consensus(caption: str, neighbours: Sequence[int], cider: CiderD) -> float:
    """Mean CIDEr-D of a caption against the references of each neighbour image."""
    return sum(cider.score(caption, n) for n in neighbours) / len(neighbours)


def rerank(candidates: Mapping[int, Candidates], neighbours: Mapping[int, Sequence[int]], cider: CiderD,
           weight: float) -> dict[int, int]:
    """Per image, the index of the candidate with the highest consensus + weight * beam score (ties: the beam's
    order, so the first)."""
    chosen = {}
    for image, options in candidates.items():
        scored = [(consensus(caption, neighbours[image], cider) + weight * score, -rank)
                  for rank, (caption, score) in enumerate(options)]
        chosen[image] = -max(scored)[1]
    return chosen
