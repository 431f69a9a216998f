"""Self-critical sequence training (Rennie et al. 2017): REINFORCE on CIDEr-D with the greedy decode as baseline.

`CiderD` scores captions against one image's references with document frequencies counted once over the whole
training set, as coco-caption's CiderScorer defines CIDEr-D (n = 1..4, σ = 6, clipped counts, Gaussian length
penalty, ×10). `sample_with_logprobs` draws one caption per row through the captioner's incremental protocol
with the gradient kept, and `scst_loss` turns sample and baseline rewards into the policy-gradient loss.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.decoding import NEVER_GENERATED
from pipeline.tokens import END_ID, START_ID

Ngram = tuple[str, ...]

# Reference vectors are kept for at most this many images (~26 KB each, so ~260 MB): all of the default 800; of full
# COCO's 113k the rest are recomputed per batch (12 ms instead of 4 ms per 64 captions; a default step takes ~0.3 s).
CACHED_IMAGES = 10_000


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter[Ngram]:
    """Term frequency of every 1..n-gram of a caption."""
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D against fixed references: idf from document frequencies over images, built once.

    Each image's reference vectors are computed on first use and kept (up to CACHED_IMAGES images).
    """

    def __init__(self, references: Mapping[int, Sequence[str]], n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CIDEr-D needs references for at least one image")
        self.n, self.sigma = n, sigma
        self.references = references
        df: Counter[Ngram] = Counter()
        for refs in references.values():  # an n-gram counts once per image, however many captions use it
            df.update({g for ref in refs for g in ngram_counts(ref.split(), n)})
        self.log_images = math.log(float(len(references)))  # coco-caption's "ref_len"
        # idf per n-gram; an n-gram absent from every reference gets df 1 (log 1 = 0), as in coco-caption
        self.idf = {g: self.log_images - math.log(c) for g, c in df.items()}
        self._refs: dict[int, list[tuple[dict[Ngram, float], list[float], int]]] = {}

    def vector(self, words: Sequence[str]) -> tuple[dict[Ngram, float], list[float], int]:
        """tf-idf weights of a caption's n-grams, the norm per n, and its length.

        The length is the number of bigrams, as coco-caption counts it (its `n == 1` tests a 0-based n-gram index):
        the penalty only sees differences, which equal those of word counts unless a caption has under two words.
        """
        vec, norms = {}, [0.0] * self.n
        for g, tf in ngram_counts(words, self.n).items():
            vec[g] = w = tf * self.idf.get(g, self.log_images)
            norms[len(g) - 1] += w * w
        return vec, [math.sqrt(s) for s in norms], max(0, len(words) - 1)

    def _reference_vectors(self, image: int) -> list[tuple[dict[Ngram, float], list[float], int]]:
        if image in self._refs:
            return self._refs[image]
        vectors = [self.vector(ref.split()) for ref in self.references[image]]
        if len(self._refs) < CACHED_IMAGES:
            self._refs[image] = vectors
        return vectors

    def score(self, caption: str, image: int) -> float:
        """CIDEr-D of one caption against every reference of `image`."""
        vec, norms, length = self.vector(caption.split())
        refs = self._reference_vectors(image)
        total = 0.0
        for ref_vec, ref_norms, ref_length in refs:
            sims = [0.0] * self.n
            for g, w in vec.items():  # clipped: a repeated n-gram earns no more than the reference holds
                r = ref_vec.get(g, 0.0)
                sims[len(g) - 1] += min(w, r) * r
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            total += penalty * sum(s / (a * b) if a and b else s for s, a, b in zip(sims, norms, ref_norms,
                                                                                     strict=True))
        return 10.0 * total / (self.n * len(refs))

    def scores(self, captions: Sequence[str], images: Sequence[int]) -> np.ndarray:
        """CIDEr-D of each caption against its image's references: (B,) float64."""
        return np.array([self.score(c, i) for c, i in zip(captions, images, strict=True)], dtype=np.float64)


def sample_with_logprobs(model: nn.Module, memory: Tensor, max_len: int) -> tuple[list[list[int]], Tensor]:
    """One multinomial caption per memory row, keeping the graph: (tokens cut before <end>, sum log π (B,)).

    The policy is the model's distribution renormalised without <pad>/<start>/<unk> (never generated, as in
    pipeline.decoding), so log π is of that distribution. The sum covers every token up to and including
    <end>; a row that never ends counts its max_len tokens. Runs in the model's current (training) mode.
    """
    b = memory.shape[0]
    tokens = torch.full((b,), START_ID, dtype=torch.long, device=memory.device)
    state = model.init_state(memory, b)
    alive = torch.ones(b, dtype=torch.bool, device=memory.device)
    total = torch.zeros(b, device=memory.device)
    history = []
    banned = None
    for _ in range(max_len):
        logp, state, _ = model.step(memory, state, tokens)  # (B, V)
        if banned is None:
            banned = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)  # (V,)
            banned[list(NEVER_GENERATED)] = True
        # out of place: log_softmax's backward needs its output unchanged
        logp = torch.log_softmax(logp.float().masked_fill(banned, float("-inf")), dim=-1)  # (B, V) renormalised
        tokens = torch.multinomial(logp.detach().exp(), 1)[:, 0]  # (B,)
        total = total + torch.where(alive, logp.gather(1, tokens[:, None])[:, 0], 0.0)
        history.append(tokens)
        alive = alive & (tokens != END_ID)
        if not alive.any():
            break
    rows = torch.stack(history, dim=1).tolist()  # (B, steps)
    return [row[: row.index(END_ID)] if END_ID in row else row for row in rows], total


def scst_loss(logprob: Tensor, reward: Tensor, baseline: Tensor) -> Tensor:
    """REINFORCE with a baseline: −mean over rows of (reward − baseline) × log π(sample). All (B,)."""
    return -((reward - baseline).to(logprob.dtype) * logprob).mean()
