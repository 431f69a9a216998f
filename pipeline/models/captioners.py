"""Image captioners: Show and Tell, Show Attend and Tell, and a transformer decoder.

Every captioner has `encode(images) -> memory` (= `encode_features(encoder(images))`, so pre-extracted
features skip the CNN), a teacher-forced `forward(memory, inputs) -> (logits (B, T, V), aux)`, and the
incremental protocol `init_state` / `step` / `select` used by pipeline.decoding. `step` repeated over the
teacher-forced inputs reproduces `forward`'s log-softmax exactly (in eval mode), which is what makes
decoding correct.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.attention import SoftAttention, doubly_stochastic_penalty, sinusoid_1d, sinusoid_2d
from pipeline.models.encoders import ImageEncoder, build_encoder
from pipeline.params import CaptionerParams
from pipeline.tokens import PAD_ID

logger = logging.getLogger(__name__)

ARCHS = ("show_tell", "show_attend_tell", "transformer")


def make_embedding(vocab_size: int, embed_size: int, pretrained: Tensor | None = None) -> nn.Embedding:
    """Word embeddings (padding_idx 0), optionally started from a float matrix (V, E)."""
    embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
    if pretrained is not None:
        if tuple(pretrained.shape) != (vocab_size, embed_size):
            raise ValueError(f"pretrained embeddings: expected shape ({vocab_size}, {embed_size}) "
                             f"(vocabulary size, models.captioner.embed_size), got {tuple(pretrained.shape)}")
        with torch.no_grad():
            embedding.weight.copy_(pretrained)
            embedding.weight[PAD_ID].zero_()  # <pad> never carries meaning (and gets no gradient)
    return embedding


class Captioner(nn.Module):
    """Base: an image encoder, word embeddings, and the parameter groups for the optimiser."""

    def __init__(self, encoder: ImageEncoder, vocab_size: int, embed_size: int,
                 embeddings: Tensor | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.vocab_size = vocab_size
        self.embed = make_embedding(vocab_size, embed_size, embeddings)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Trainable encoder parameters (their own learning rate: encoder_lr)."""
        return self.encoder.trainable_parameters()

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the encoder."""
        return [p for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("encoder.")]

    def encode(self, images: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) -> memory with batch on dim 0: the CNN, then encode_features."""
        return self.encode_features(self.encoder(images))  # (B, C, h, w) -> memory

    def encode_features(self, feats: Tensor) -> Tensor:
        """Encoder feature maps (B, C, h, w) -> memory: the part of `encode` after the CNN.

        Training on pre-extracted features (stage `features`) calls this directly with a frozen encoder.
        """
        raise NotImplementedError


class ShowTell(Captioner):
    """Vinyals et al. 2015: the pooled image feature is the LSTM's first input, then the words."""

    def __init__(self, encoder: ImageEncoder, vocab_size: int, embed_size: int, hidden_size: int,
                 dropout: float, embeddings: Tensor | None = None) -> None:
        super().__init__(encoder, vocab_size, embed_size, embeddings)
        self.image_proj = nn.Linear(encoder.out_channels, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, vocab_size)

    def encode_features(self, feats: Tensor) -> Tensor:
        """Feature maps (B, C, h, w) -> image embedding (B, E)."""
        return self.image_proj(feats.mean(dim=(2, 3)))  # (B, C) -> (B, E)

    def forward(self, memory: Tensor, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Memory (B, E), inputs (B, T) -> logits (B, T, V); one LSTM call over the whole sequence."""
        x = torch.cat([memory.unsqueeze(1), self.embed(inputs)], dim=1)  # (B, T + 1, E)
        out, _ = self.lstm(self.drop(x))  # (B, T + 1, H)
        return self.out(self.drop(out[:, 1:])), {}  # position 0 read the image: no prediction

    def init_state(self, memory: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        """Run the LSTM on the image embedding: (h, c), each (1, B, H)."""
        _, state = self.lstm(self.drop(memory.unsqueeze(1)))  # input (B, 1, E)
        return state

    def step(self, memory: Tensor, state: tuple[Tensor, Tensor],
             tokens: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], None]:
        """One token per row (B,) -> next-token log-probs (B, V), new state, no attention."""
        out, state = self.lstm(self.drop(self.embed(tokens).unsqueeze(1)), state)  # (B, 1, H)
        return F.log_softmax(self.out(self.drop(out[:, 0])), dim=-1), state, None

    def select(self, state: tuple[Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
        """Gather rows of (h, c) (batch on dim 1)."""
        return tuple(s.index_select(1, index) for s in state)  # type: ignore[return-value]


class ShowAttendTell(Captioner):
    """Xu et al. 2015: an LSTMCell attending over image regions at every step, with a gate β."""

    doubly_stochastic_penalty = staticmethod(doubly_stochastic_penalty)

    def __init__(self, encoder: ImageEncoder, vocab_size: int, embed_size: int, hidden_size: int,
                 attention: str, attention_size: int, dropout: float,
                 embeddings: Tensor | None = None) -> None:
        super().__init__(encoder, vocab_size, embed_size, embeddings)
        c, d = encoder.out_channels, hidden_size  # regions are projected to D = hidden_size
        self.feature_proj = nn.Identity() if c == d else nn.Linear(c, d)
        self.attention = SoftAttention(attention, d, hidden_size, attention_size)
        self.init_h = nn.Linear(d, hidden_size)
        self.init_c = nn.Linear(d, hidden_size)
        self.gate = nn.Linear(hidden_size, d)
        self.cell = nn.LSTMCell(embed_size + d, hidden_size)
        self.out_h = nn.Linear(hidden_size, embed_size)  # deep output: L_o(E y + L_h h + L_z z)
        self.out_z = nn.Linear(d, embed_size)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(embed_size, vocab_size)

    def encode_features(self, feats: Tensor) -> Tensor:
        """Feature maps (B, C, h, w) -> region features (B, N = h * w, D)."""
        return self.feature_proj(feats.flatten(2).transpose(1, 2))  # (B, N, C) -> (B, N, D)

    def init_state(self, memory: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """(h, c), each (B, H), from the mean region feature, and the attention keys (B, N, K).

        The keys depend only on the image, so decoding computes them once here instead of at every
        step (they were the largest cost of a beam-search step); `select` carries them with the rows.
        """
        mean = memory.mean(dim=1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), self.attention.keys(memory)

    def _advance(self, memory: Tensor, keys: Tensor, state: tuple[Tensor, Tensor],
                 emb: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """One decoder step from word embeddings (B, E) -> logits (B, V), new state, α (B, N)."""
        h, c = state
        context, alpha = self.attention(memory, h, keys)  # (B, D), (B, N)
        z = torch.sigmoid(self.gate(h)) * context  # (B, D): β gates how much image is used
        h, c = self.cell(torch.cat([emb, z], dim=1), (h, c))  # (B, H)
        logits = self.out(self.drop(emb + self.out_h(h) + self.out_z(z)))  # (B, V)
        return logits, (h, c), alpha

    def forward(self, memory: Tensor, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Memory (B, N, D), inputs (B, T) -> logits (B, T, V) and aux {"alphas": (B, T, N)}.

        Padding costs nothing: rows are sorted by length and the batch shrinks as rows end (as with
        packed sequences), so positions after a row's last non-<pad> input get zero logits and
        attention, which the loss and the attention penalty skip.
        """
        b, t_max = inputs.shape
        steps = torch.arange(1, t_max + 1, device=inputs.device)
        lengths = ((inputs != PAD_ID) * steps).amax(dim=1)  # (B,) up to the last real input
        lengths, order = lengths.sort(descending=True)
        memory, inputs = memory.index_select(0, order), inputs.index_select(0, order)
        h, c, keys = self.init_state(memory, b)  # keys (B, N, K), shared by every step
        emb = self.drop(self.embed(inputs))  # (B, T, E)
        running = (lengths[None, :] >= steps[:, None]).sum(dim=1).tolist()  # rows still going at each step
        logits, alphas = [], []
        for t, n in enumerate(running):
            step_logits, (h, c), alpha = self._advance(memory[:n], keys[:n], (h[:n], c[:n]), emb[:n, t])
            logits.append(F.pad(step_logits, (0, 0, 0, b - n)))  # (B, V), zero rows for ended captions
            alphas.append(F.pad(alpha, (0, 0, 0, b - n)))  # (B, N)
        back = torch.argsort(order)  # the caller's row order
        return (torch.stack(logits, dim=1).index_select(0, back),
                {"alphas": torch.stack(alphas, dim=1).index_select(0, back)})

    def step(self, memory: Tensor, state: tuple[Tensor, Tensor, Tensor],
             tokens: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
        """One token per row (B,) -> next-token log-probs (B, V), new state, α (B, N)."""
        h, c, keys = state
        emb = self.drop(self.embed(tokens))  # (B, E)
        logits, (h, c), alpha = self._advance(memory, keys, (h, c), emb)
        return F.log_softmax(logits, dim=-1), (h, c, keys), alpha

    def select(self, state: tuple[Tensor, Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gather rows of (h, c, keys) (batch on dim 0)."""
        return tuple(s.index_select(0, index) for s in state)  # type: ignore[return-value]


class TransformerCaptioner(Captioner):
    """A pre-norm transformer decoder cross-attending to projected regions with 2-D position codes."""

    def __init__(self, encoder: ImageEncoder, vocab_size: int, embed_size: int, d_model: int,
                 layers: int, heads: int, ff_size: int, dropout: float,
                 embeddings: Tensor | None = None) -> None:
        super().__init__(encoder, vocab_size, embed_size, embeddings)
        self.d_model = d_model
        self.memory_proj = nn.Linear(encoder.out_channels, d_model)
        self.memory_norm = nn.LayerNorm(d_model)  # pre-norm layers do not normalise the memory
        self.token_proj = nn.Identity() if embed_size == d_model else nn.Linear(embed_size, d_model)
        layer = nn.TransformerDecoderLayer(d_model, heads, ff_size, dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(d_model))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)

    def encode_features(self, feats: Tensor) -> Tensor:
        """Feature maps (B, C, h, w) -> memory (B, N = h * w, D) with 2-D sinusoidal positions added."""
        _, _, h, w = feats.shape
        memory = self.memory_proj(feats.flatten(2).transpose(1, 2))  # (B, N, D)
        return self.memory_norm(memory + sinusoid_2d(h, w, self.d_model, memory.device).to(memory.dtype))

    def forward(self, memory: Tensor, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Memory (B, N, D), inputs (B, T) -> logits (B, T, V), causally masked."""
        t = inputs.size(1)
        x = self.token_proj(self.embed(inputs))  # (B, T, D)
        x = self.drop(x + sinusoid_1d(t, self.d_model, x.device).to(x.dtype))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=x.dtype)  # (T, T)
        y = self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)  # (B, T, D)
        return self.out(y), {}

    def init_state(self, memory: Tensor, batch_size: int) -> Tensor:
        """The empty token prefix (B, 0)."""
        return torch.zeros(batch_size, 0, dtype=torch.long, device=memory.device)

    def step(self, memory: Tensor, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, None]:
        """Append tokens (B,) to the prefix and recompute it: log-probs (B, V), prefix (B, t + 1)."""
        prefix = torch.cat([state, tokens.unsqueeze(1)], dim=1)  # (B, t + 1)
        logits, _ = self.forward(memory, prefix)  # (B, t + 1, V)
        return F.log_softmax(logits[:, -1], dim=-1), prefix, None

    def select(self, state: Tensor, index: Tensor) -> Tensor:
        """Gather rows of the prefix (B, t)."""
        return state.index_select(0, index)


def build_captioner(params: CaptionerParams, vocab_size: int,
                    embeddings: np.ndarray | None = None) -> Captioner:
    """Make the captioner `params.arch` with its encoder; `embeddings` (V, E) iff pretrained_embeddings."""
    if params.pretrained_embeddings and embeddings is None:
        raise ValueError("models.captioner.pretrained_embeddings is true but no embedding matrix was given "
                         "(run the embeddings stage)")
    if embeddings is not None and not params.pretrained_embeddings:
        raise ValueError("an embedding matrix was given but models.captioner.pretrained_embeddings is false")
    vectors = None if embeddings is None else torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    encoder = build_encoder(params.encoder, params.encoder_weights, params.freeze_encoder,
                            params.finetune_blocks)
    common: dict[str, Any] = {"encoder": encoder, "vocab_size": vocab_size,
                              "embed_size": params.embed_size, "dropout": params.dropout,
                              "embeddings": vectors}
    if params.arch == "show_tell":
        return ShowTell(hidden_size=params.hidden_size, **common)
    if params.arch == "show_attend_tell":
        return ShowAttendTell(hidden_size=params.hidden_size, attention=params.attention,
                              attention_size=params.attention_size, **common)
    if params.arch == "transformer":
        return TransformerCaptioner(d_model=params.hidden_size, layers=params.layers, heads=params.heads,
                                    ff_size=params.ff_size, **common)
    raise ValueError(f"unknown captioner arch {params.arch!r}: expected one of {', '.join(ARCHS)}")
