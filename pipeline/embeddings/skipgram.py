"""Skip-gram word2vec with negative sampling (Mikolov et al. 2013), trained with PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokens import END_ID, SPECIALS

log = logging.getLogger(__name__)

FIRST_WORD = len(SPECIALS)  # ids below this are specials: never a centre nor a context
NEGATIVE_POWER = 0.75  # word2vec's smoothing of the unigram distribution for negatives


@dataclass(frozen=True)
class SkipGramConfig:
    """Training hyper-parameters (the `embeddings` params section, minus the method choice)."""

    dim: int
    window: int
    negatives: int
    subsample: float
    epochs: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class SkipGramResult:
    """Trained input vectors (V, dim) float32 with training statistics."""

    vectors: np.ndarray
    pairs: int  # positive (centre, context) pairs trained on, all epochs together
    final_loss: float  # mean loss per pair over the last epoch
    epoch_losses: list[float]


def load_stream(path: str | Path, vocab_size: int) -> np.ndarray:
    """Load a flat int id stream (.npy), checking it is 1-D integers within the vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the vocab stage first: dvc repro vocab)")
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a readable .npy array: {err}") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer id stream, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{path}: ids must lie in [0, {vocab_size}) for words.json, "
                         f"got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)


def word_counts(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of each id in the stream (V,), specials set to zero."""
    counts = np.bincount(stream, minlength=vocab_size).astype(np.int64)
    counts[:FIRST_WORD] = 0
    return counts


def keep_probability(counts: np.ndarray, threshold: float) -> np.ndarray:
    """Per-id probability of keeping a token: min(1, sqrt(t / f(w))), zero for specials."""
    total = counts.sum()
    freq = counts / max(total, 1)
    with np.errstate(divide="ignore"):
        keep = np.minimum(1.0, np.sqrt(threshold / freq))  # unseen words: inf -> 1 (never drawn)
    keep[:FIRST_WORD] = 0.0
    return keep


def subsample_mask(stream: np.ndarray, keep_prob: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (N,) of the tokens that survive frequent-word subsampling this epoch."""
    return rng.random(stream.shape[0]) < keep_prob[stream]


def skipgram_pairs(stream: np.ndarray, window: int, rng: np.random.Generator,
                   keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centres, contexts) id arrays for every centre with a sampled window in 1..window.

    Specials and tokens not in `keep` are removed first (so the window reaches past them, as in
    word2vec); <end> still separates sentences, and no pair crosses it.
    """
    sentence = np.cumsum(stream == END_ID)  # (N,) sentence index; changes after each <end>
    mask = stream >= FIRST_WORD
    if keep is not None:
        mask &= keep
    words, sentence = stream[mask], sentence[mask]  # (n,) each
    n = words.shape[0]
    reach = rng.integers(1, window + 1, size=n)  # (n,) effective window of each centre
    centres, contexts = [], []
    for d in range(1, window + 1):  # loop over distances only; tokens are vectorised
        i = np.arange(max(n - d, 0))  # left token of each pair at distance d
        j = i + d
        same = sentence[i] == sentence[j]
        right = same & (reach[i] >= d)  # centre i sees context j
        left = same & (reach[j] >= d)  # centre j sees context i
        centres += [words[i[right]], words[j[left]]]
        contexts += [words[j[right]], words[i[left]]]
    if not centres:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(centres), np.concatenate(contexts)


def negative_cdf(counts: np.ndarray) -> np.ndarray:
    """Cumulative unnormalised unigram^(3/4) weights (V,), specials weighted zero."""
    weights = counts.astype(np.float64) ** NEGATIVE_POWER
    weights[:FIRST_WORD] = 0.0
    if weights.sum() <= 0:
        raise ValueError("no words to sample negatives from: the stream holds only special tokens")
    return np.cumsum(weights)


def sample_negatives(cdf: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Ids drawn from the distribution behind `cdf` (inverse-CDF with searchsorted)."""
    u = rng.random(shape) * cdf[-1]
    ids = np.searchsorted(cdf, u, side="right")
    # Float rounding could land at cdf[-1]; clamp to the last id that has any weight.
    return np.minimum(ids, int(np.searchsorted(cdf, cdf[-1], side="left")))


class SkipGram(nn.Module):
    """Input (centre) and output (context) embedding tables with the negative-sampling loss."""

    def __init__(self, vocab_size: int, dim: int, generator: torch.Generator):
        super().__init__()
        self.inp = nn.Embedding(vocab_size, dim, sparse=True)
        self.out = nn.Embedding(vocab_size, dim, sparse=True)
        with torch.no_grad():  # word2vec's init: small uniform inputs, zero outputs
            self.inp.weight.uniform_(-0.5 / dim, 0.5 / dim, generator=generator)
            self.out.weight.zero_()

    def forward(self, centres: torch.Tensor, contexts: torch.Tensor,
                negatives: torch.Tensor) -> torch.Tensor:
        """Summed loss -log σ(u_o·v_c) - Σ_k log σ(-u_k·v_c) over the batch."""
        v = self.inp(centres)  # (B, D)
        u_o = self.out(contexts)  # (B, D)
        u_k = self.out(negatives)  # (B, K, D)
        pos = F.logsigmoid((v * u_o).sum(-1))  # (B,)
        neg = F.logsigmoid(-torch.bmm(u_k, v.unsqueeze(2)).squeeze(2)).sum(-1)  # (B,)
        return -(pos + neg).sum()


def _train_epoch(model: SkipGram, opt: torch.optim.Optimizer, centres: np.ndarray,
                 contexts: np.ndarray, cdf: np.ndarray, cfg: SkipGramConfig,
                 rng: np.random.Generator, device: torch.device) -> float:
    """One pass over the (already shuffled) pairs; returns the mean loss per pair."""
    total = 0.0
    for start in range(0, centres.shape[0], cfg.batch_size):
        c = torch.from_numpy(centres[start:start + cfg.batch_size]).to(device)  # (B,)
        o = torch.from_numpy(contexts[start:start + cfg.batch_size]).to(device)  # (B,)
        k = torch.from_numpy(sample_negatives(cdf, (c.shape[0], cfg.negatives), rng)).to(device)  # (B, K)
        loss = model(c, o, k)
        opt.zero_grad(set_to_none=True)
        (loss / c.shape[0]).backward()  # mean per pair keeps the step size independent of B
        opt.step()
        total += float(loss.detach())
    return total / centres.shape[0]


def train_skipgram(stream: np.ndarray, vocab_size: int, cfg: SkipGramConfig, seed: int,
                   device: str | torch.device = "cpu") -> SkipGramResult:
    """Train skip-gram on one id stream (<end> = sentence boundary); same seed, same vectors."""
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    counts = word_counts(stream, vocab_size)
    cdf = negative_cdf(counts)
    keep_prob = keep_probability(counts, cfg.subsample)
    model = SkipGram(vocab_size, cfg.dim, torch.Generator().manual_seed(seed)).to(device)
    opt = torch.optim.SparseAdam(list(model.parameters()), lr=cfg.lr)
    pairs, losses = 0, []
    for epoch in range(cfg.epochs):
        # Fresh subsampling and window draws every epoch, as word2vec does.
        keep = subsample_mask(stream, keep_prob, rng)
        centres, contexts = skipgram_pairs(stream, cfg.window, rng, keep)
        if centres.shape[0] == 0:
            raise ValueError("no skip-gram pairs: every sentence has fewer than two words after "
                             "subsampling (corpus too small, or embeddings.subsample too low)")
        order = rng.permutation(centres.shape[0])
        losses.append(_train_epoch(model, opt, centres[order], contexts[order], cdf, cfg, rng, device))
        pairs += int(centres.shape[0])
        log.info("skip-gram epoch %d/%d: %d pairs, loss %.4f", epoch + 1, cfg.epochs,
                 centres.shape[0], losses[-1])
    vectors = model.inp.weight.detach().cpu().numpy().astype(np.float32, copy=True)  # (V, D)
    vectors[0] = 0.0  # <pad> carries no meaning
    return SkipGramResult(vectors, pairs, losses[-1], losses)
