"""The bigram family's models.bigram_lm section: its own pydantic schema, validated when params load."""

from typing import Literal

from pydantic import Field

from pipeline.params import Section


class BigramLmParams(Section):
    level: Literal["char", "word"]
    embed_size: int = Field(ge=2, le=1024)
    context: int = Field(ge=2, le=4096)  # training windows (a language model family without a carried state)
    pretrained_embeddings: bool
