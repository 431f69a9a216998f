"""Soft attention over image regions (Bahdanau/Luong scores), its regulariser, and position codes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCORES = ("additive", "dot", "general")


class SoftAttention(nn.Module):
    """Soft attention: weights α over N feature vectors from a query h, and the weighted context.

    Scores: `additive` v^T tanh(W_f f + W_h h) (Bahdanau); `dot` (P f)·h, with P a projection of the
    features to the hidden size when the sizes differ; `general` f^T W h (Luong).
    `attention_size` is the width of the additive layer (unused by the other two).
    """

    def __init__(self, score: str, feature_size: int, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown attention score {score!r}: expected one of {', '.join(SCORES)}")
        self.score = score
        self.v: nn.Module | None = None
        if score == "additive":
            self.key: nn.Module = nn.Linear(feature_size, attention_size)
            self.query: nn.Module = nn.Linear(hidden_size, attention_size, bias=False)
            self.v = nn.Linear(attention_size, 1, bias=False)
        elif score == "dot":
            same = feature_size == hidden_size
            self.key = nn.Identity() if same else nn.Linear(feature_size, hidden_size, bias=False)
            self.query = nn.Identity()
        else:  # general: f^T (W h), with W mapping the query into feature space
            self.key = nn.Identity()
            self.query = nn.Linear(hidden_size, feature_size, bias=False)

    def keys(self, features: Tensor) -> Tensor:
        """Features (B, N, F) -> keys (B, N, K); independent of the query, so compute once per image."""
        return self.key(features)

    def scores(self, keys: Tensor, hidden: Tensor) -> Tensor:
        """Keys (B, N, K) and query (B, H) -> unnormalised scores (B, N)."""
        q = self.query(hidden)  # (B, K)
        if self.v is not None:
            return self.v(torch.tanh(keys + q.unsqueeze(1))).squeeze(-1)  # (B, N)
        return torch.bmm(keys, q.unsqueeze(-1)).squeeze(-1)  # (B, N)

    def forward(self, features: Tensor, hidden: Tensor, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Features (B, N, F), query (B, H) -> context (B, F) and weights α (B, N) summing to 1."""
        if keys is None:
            keys = self.keys(features)
        alpha = F.softmax(self.scores(keys, hidden), dim=-1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, F)
        return context, alpha


def doubly_stochastic_penalty(alphas: Tensor, mask: Tensor) -> Tensor:
    """Mean over regions of (N·c_i / T − 1)², c_i = Σ_t α_ti, averaged over the batch (after Xu et al. 2015).

    Xu et al. sum (1 − c_i)² over regions, which asks every region for a whole step of attention: with
    more regions than words (7×7 grid, 12 words) that target is out of reach and the sum reads ~26 at
    its best. Asking each region for its share T/N of the caption's T steps instead, relative to that
    share, gives 0 for attention spread evenly over the caption and the same scale at any resolution.
    alphas (B, T, N); mask (B, T) true where the step is a real token (padding steps do not count).
    """
    real = mask.to(alphas.dtype)  # (B, T)
    coverage = (alphas * real.unsqueeze(-1)).sum(dim=1)  # (B, N)
    steps = real.sum(dim=1, keepdim=True)  # (B, 1)
    share = coverage * alphas.shape[-1] / steps.clamp(min=1.0)  # (B, N): 1 where a region gets its share
    per_item = ((share - 1.0) ** 2).mean(dim=1)  # (B,)
    has_steps = steps.squeeze(1) > 0
    return per_item[has_steps].sum() / has_steps.sum().clamp(min=1)


def sinusoid_1d(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Sinusoidal position codes (length, dim) of Vaswani et al.: sin on even, cos on odd channels."""
    half = (dim + 1) // 2
    pos = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)  # (L, 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * (-math.log(10000.0) / half))
    angles = pos * freq  # (L, half)
    codes = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (L, 2 * half)
    return codes[:, :dim]


def sinusoid_2d(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """2-D position codes (height * width, dim), row-major: half the channels code the row, half the col."""
    rows = sinusoid_1d(height, dim // 2, device)  # (h, dim/2)
    cols = sinusoid_1d(width, dim - dim // 2, device)  # (w, dim - dim/2)
    grid = torch.cat([rows.unsqueeze(1).expand(-1, width, -1),
                      cols.unsqueeze(0).expand(height, -1, -1)], dim=-1)  # (h, w, dim)
    return grid.reshape(height * width, dim)
