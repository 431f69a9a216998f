"""A bigram language model (the next token from the current one only) as a LightningModule of its own."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.training.modules import LanguageModelModule


class Bigram(nn.Module):
    """Embedding -> linear: logits of the next token given the current one; the state is the last token."""

    def __init__(self, vocab_size: int, embed_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.out = nn.Linear(embed_size, vocab_size)

    def forward(self, memory: None, inputs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """inputs (B, T) -> logits (B, T, V), state (B,)."""
        return self.out(self.embed(inputs)), inputs[:, -1]

    def init_state(self, memory: None, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, dtype=torch.long, device=self.out.weight.device)

    def step(self, memory: None, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, None]:
        """tokens (B,) -> log-probs (B, V) of the next token."""
        return self.out(self.embed(tokens)).log_softmax(-1), tokens, None

    def select(self, state: Tensor, index: Tensor) -> Tensor:
        return state.index_select(0, index)


class BigramLmModule(LanguageModelModule):
    """The built-in language-model training loop around the plug-in's own network."""

    def build_model(self, family: str, vocab_size: int, embeddings: np.ndarray | None) -> nn.Module:
        return Bigram(vocab_size, self.model_cfg.embed_size)
