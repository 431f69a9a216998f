"""Several trained captioners decoded as one (Vinyals et al. 2015 ensembled their Show and Tell models).

At every step the members' next-word distributions are averaged in probability, so beam search, n-gram blocking,
reranking and the search/model error analysis run on an ensemble exactly as on one captioner: it has the same
incremental protocol (`encode`, `init_state`, `step`, `select`). Members are captioners of one recipe trained with
different seeds: the same vocabulary and the same memory shape. When their encoders hold the same weights (a
frozen pretrained encoder) the images go through it once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold equal tensors under equal names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


class CaptionerEnsemble(nn.Module):
    """Captioners of one vocabulary whose log-probabilities are averaged in probability space at every step."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one captioner")
        sizes = [m.vocab_size for m in members]
        if len(set(sizes)) > 1:
            raise ValueError(f"ensemble members must share one vocabulary: vocabulary sizes {sizes}")
        self.members = nn.ModuleList(members)
        self.vocab_size = sizes[0]
        self.encoder = members[0].encoder
        self.shared_encoder = all(same_weights(m.encoder, self.encoder) for m in members[1:])
        if self.shared_encoder:  # keep one copy of its weights, not one per member
            for m in members[1:]:
                m.encoder = self.encoder
        self.log_members = math.log(len(members))

    def encode(self, images: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) -> every member's memory stacked on dim 1: (B, M, ...)."""
        if self.shared_encoder:
            feats = self.encoder(images)  # (B, C, h, w), once for all members
            memories = [m.encode_features(feats) for m in self.members]
        else:
            memories = [m.encode(images) for m in self.members]
        shapes = [tuple(mem.shape[1:]) for mem in memories]
        if len(set(shapes)) > 1:
            raise ValueError(f"ensemble members must share arch and sizes: their memories per image are {shapes}")
        return torch.stack(memories, dim=1)

    def init_state(self, memory: Tensor, batch_size: int) -> tuple[Any, ...]:
        """Each member's initial state from its slice of the memory."""
        return tuple(m.init_state(memory[:, i], batch_size) for i, m in enumerate(self.members))

    def step(self, memory: Tensor, state: tuple[Any, ...], tokens: Tensor) -> tuple[Tensor, tuple[Any, ...],
                                                                                    Tensor | None]:
        """One token per row (B,) -> log of the members' mean next-word probability (B, V), new states, mean α."""
        outs = [m.step(memory[:, i], s, tokens) for i, (m, s) in enumerate(zip(self.members, state, strict=True))]
        logp = torch.logsumexp(torch.stack([o[0] for o in outs]), dim=0) - self.log_members  # (M, B, V) -> (B, V)
        attention = None if any(o[2] is None for o in outs) else torch.stack([o[2] for o in outs]).mean(dim=0)
        return logp, tuple(o[1] for o in outs), attention

    def select(self, state: tuple[Any, ...], index: Tensor) -> tuple[Any, ...]:
        """Gather rows of every member's state."""
        return tuple(m.select(s, index) for m, s in zip(self.members, state, strict=True))
