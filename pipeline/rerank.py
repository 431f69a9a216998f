"""Consensus reranking (Devlin et al. 2015): the captioner proposes, the nearest training images vote.

Beam search finishes several captions per image. Of those, keep the one whose mean CIDEr-D against the
reference captions of the image's `k` nearest training images (`baselines.nearest_images`: cosine on the
captioner's own pooled encoder features) is highest, plus `weight` times its length-normalised log-probability.
The output is always one of the model's own captions: the neighbours only choose among them, so nothing is
copied from the training set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline.training.scst import CiderD

Candidates = Sequence[tuple[str, float]]  # (caption, beam score), best first


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
