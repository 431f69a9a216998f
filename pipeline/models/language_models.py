"""Language models: a recurrent LM (LSTM/GRU) and a causal decoder-only transformer.

Both implement the incremental decoding protocol of pipeline/decoding.py (`init_state`, `step`,
`select`); `memory` is always None for them.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.tokens import PAD_ID

if TYPE_CHECKING:
    from pipeline.params import LstmLmParams, TransformerLmParams

log = logging.getLogger(__name__)

RnnState = Tensor | tuple[Tensor, Tensor]


def detach_state(state: RnnState | None) -> RnnState | None:
    """Cut the graph behind a carried hidden state (truncated BPTT between batches)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


def _no_memory(memory: object) -> None:
    if memory is not None:
        raise ValueError("language models take no memory: pass memory=None")


def _load_embeddings(embed: nn.Embedding, embeddings: np.ndarray | None) -> None:
    """Copy pretrained vectors (V, E) into an embedding table, checking the shape."""
    if embeddings is None:
        return
    expected = tuple(embed.weight.shape)
    if tuple(embeddings.shape) != expected:
        raise ValueError(f"pretrained embeddings: expected shape {expected} (vocab, dim), "
                         f"got {tuple(embeddings.shape)}")
    with torch.no_grad():
        embed.weight.copy_(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))


class RNNLanguageModel(nn.Module):
    """Embedding -> dropout -> multi-layer LSTM/GRU -> dropout -> linear over the vocabulary."""

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, layers: int,
                 dropout: float, cell: str = "lstm", tie_weights: bool = False,
                 embeddings: np.ndarray | None = None):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell: expected 'lstm' or 'gru', got {cell!r}")
        if tie_weights and embed_size != hidden_size:
            raise ValueError(f"tie_weights needs embed_size == hidden_size "
                             f"(got {embed_size} and {hidden_size})")
        self.cell, self.layers, self.hidden_size = cell, layers, hidden_size
        self.embed = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        _load_embeddings(self.embed, embeddings)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        # Inter-layer dropout only exists with >1 layer (torch warns otherwise).
        self.rnn = rnn(embed_size, hidden_size, num_layers=layers, batch_first=True,
                       dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            # Weight tying (Press & Wolf 2017; Inan et al. 2017): the output layer reuses the
            # input embedding, fewer parameters and usually lower perplexity.
            self.head.weight = self.embed.weight

    def forward(self, memory: None = None, inputs: Tensor | None = None,
                state: RnnState | None = None) -> tuple[Tensor, RnnState]:
        """inputs (B, T) -> logits (B, T, V) and the final hidden state (carry it, detached)."""
        _no_memory(memory)
        if inputs is None:
            raise TypeError("RNNLanguageModel.forward: inputs (B, T) is required")
        x = self.drop(self.embed(inputs))  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(self.drop(out)), state

    def init_state(self, memory: None, batch_size: int) -> RnnState:
        """Zero hidden state: (h, c) for LSTM, h for GRU, each (layers, B, H)."""
        _no_memory(memory)
        w = self.head.weight
        h = w.new_zeros(self.layers, batch_size, self.hidden_size)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h

    def step(self, memory: None, state: RnnState, tokens: Tensor) -> tuple[Tensor, RnnState, None]:
        """Feed one token per row (B,) -> next-token log-probs (B, V), new state, no attention."""
        logits, state = self(memory, tokens[:, None], state)  # (B, 1, V)
        return F.log_softmax(logits[:, 0].float(), dim=-1), state, None

    def select(self, state: RnnState, index: Tensor) -> RnnState:
        """Gather batch rows (batch is dim 1 of cuDNN states)."""
        if isinstance(state, tuple):
            return tuple(s.index_select(1, index) for s in state)  # type: ignore[return-value]
        return state.index_select(1, index)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """Fixed sin/cos position table (length, dim) (Vaswani et al. 2017)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])  # odd dim: one fewer cosine column
    return table


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, d_model: int, heads: int, dropout: float, bias: bool = True):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj.residual = True  # marks the GPT-2 scaled initialisation
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, T, D)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(  # (B, heads, T, D/heads)
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, heads: int, ff_size: int, dropout: float, bias: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model, bias=bias), nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, heads, dropout, bias)
        out = nn.Linear(ff_size, d_model, bias=bias)
        out.residual = True
        self.mlp = nn.Sequential(nn.Linear(d_model, ff_size, bias=bias), nn.GELU(), out, nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


POSITIONS = ("learned", "sinusoidal")


class TransformerLanguageModel(nn.Module):
    """Causal decoder-only transformer; the output head is tied to the token embedding.

    positions: "learned" (GPT-2, nanoGPT): a trained (context, D) table, N(0, 0.02) like the token embedding,
    added to the unscaled token embedding; "sinusoidal" (Vaswani et al. 2017): fixed sin/cos added to the token
    embedding scaled by sqrt(D), so that the N(0, 0.02) embedding is not drowned by the unit-amplitude sinusoids.
    At nanoGPT's char recipe the learned table reaches a 0.04 nats lower val loss (BENCHMARKS.md, "Side by
    side"). bias: biases in every Linear and LayerNorm (GPT-2 has them; nanoGPT's recipes drop them).
    """

    def __init__(self, vocab_size: int, d_model: int, layers: int, heads: int, ff_size: int,
                 dropout: float, context: int, embeddings: np.ndarray | None = None,
                 positions: str = "learned", bias: bool = True):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {POSITIONS}, got {positions!r}")
        self.context, self.d_model, self.positions = context, d_model, positions
        self.embed = nn.Embedding(vocab_size, d_model)
        if positions == "learned":
            self.position = nn.Embedding(context, d_model)  # a table read by slicing: row t is position t
        else:
            self.register_buffer("sinusoids", sinusoidal_positions(context, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, ff_size, dropout, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied output head (Press & Wolf 2017)
        self._init_weights(layers)
        _load_embeddings(self.embed, embeddings)

    def _init_weights(self, layers: int) -> None:
        """GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * layers) if getattr(module, "residual", False) else 0.02
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, memory: None = None, inputs: Tensor | None = None,
                state: None = None) -> tuple[Tensor, None]:
        """inputs (B, T) with T <= context -> logits (B, T, V); no state is carried."""
        _no_memory(memory)
        if inputs is None:
            raise TypeError("TransformerLanguageModel.forward: inputs (B, T) is required")
        t = inputs.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.context})")
        if self.positions == "learned":
            x = self.embed(inputs) + self.position.weight[:t]  # (B, T, D)
        else:
            x = self.embed(inputs) * math.sqrt(self.d_model) + self.sinusoids[:t]  # (B, T, D)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)), None

    def init_state(self, memory: None, batch_size: int) -> Tensor:
        """The state is the token prefix (B, t); it starts empty."""
        _no_memory(memory)
        return torch.zeros(batch_size, 0, dtype=torch.long, device=self.embed.weight.device)

    def step(self, memory: None, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, None]:
        """Append tokens (B,), recompute over the last `context` tokens -> log-probs (B, V)."""
        prefix = torch.cat([state, tokens[:, None].to(state.dtype)], dim=1)[:, -self.context:]
        logits, _ = self(memory, prefix)  # (B, t, V)
        return F.log_softmax(logits[:, -1].float(), dim=-1), prefix, None

    def select(self, state: Tensor, index: Tensor) -> Tensor:
        """Gather rows of the prefix (B, t)."""
        return state.index_select(0, index)


def build_language_model(family: str, section: LstmLmParams | TransformerLmParams,
                         vocab_size: int, embeddings: np.ndarray | None = None) -> nn.Module:
    """Build `lstm_lm` or `transformer_lm` from its params section (embeddings iff pretrained)."""
    from pipeline.params import LstmLmParams, TransformerLmParams  # the models need no pydantic

    if section.pretrained_embeddings != (embeddings is not None):
        raise ValueError(f"models.{family}.pretrained_embeddings is {section.pretrained_embeddings} "
                         f"but embeddings were {'not ' if embeddings is None else ''}given")
    if isinstance(section, LstmLmParams):
        return RNNLanguageModel(vocab_size, section.embed_size, section.hidden_size, section.layers,
                                section.dropout, section.cell, section.tie_weights, embeddings)
    if isinstance(section, TransformerLmParams):
        return TransformerLanguageModel(vocab_size, section.d_model, section.layers, section.heads,
                                        section.ff_size, section.dropout, section.context, embeddings,
                                        positions=section.positions, bias=section.bias)
    raise ValueError(f"models.{family}: a {type(section).__name__} section builds no language model; "
                     "expected LstmLmParams or TransformerLmParams")
