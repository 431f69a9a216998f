"""The model families: one record each, the single home of what the pipeline knows about a family.

The fit loop, sweeps, evaluation, the report, the CLI and params' checks look a family up here instead of
switching on its name. A record is plain data (no torch): its LightningModule and params schemas are named
"package.module:Name" and imported only when used, so the CLI and the params loader stay fast.

Families from other packages register through the entry-point group `capline.families` (a `Family` record
each); their params sections are validated by their own schemas (README, "Your own model family").
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
from typing import Any, Literal

ENTRY_POINTS = "capline.families"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its name (= its params sections and DVC stage keys) and how it trains and scores."""

    name: str
    task: Literal["captioning", "language_model"]  # images -> captions, or text -> next token
    monitor: str  # the validation metric best checkpoints, early stopping and sweeps follow
    mode: Literal["min", "max"]
    module: str  # its LightningModule, "package.module:Class"
    model_params: str  # the pydantic schema of models.<name>, "package.module:Class"
    train_params: str  # the pydantic schema of train.<name>
    carries_state: bool = False  # an RNN's hidden state runs across batches: one token stream, cut in bptt
    extra_epochs: str | None = None  # the train.<name> key of epochs run after max_epochs (self-critical)

    @property
    def captions(self) -> bool:
        """Whether it captions images (a vision encoder, decoded captions, caption metrics, features)."""
        return self.task == "captioning"

    @property
    def served_input(self) -> str:
        """The column each record of a request to its served model holds: base64 image files or text prompts."""
        return "image" if self.captions else "prompt"

    def lightning_module(self) -> type:
        """The LightningModule class, imported now."""
        return _resolve(self.module)

    def schema(self, group: Literal["models", "train"]) -> type:
        """The pydantic model of its `models.<name>` or `train.<name>` section, imported now."""
        return _resolve(self.model_params if group == "models" else self.train_params)

    def epochs(self, train_section: Any) -> int:
        """Every epoch a run of train_section (its train.<name> params) goes through."""
        extra = getattr(train_section, self.extra_epochs) if self.extra_epochs else 0
        return train_section.max_epochs + extra


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


BUILT_IN: dict[str, Family] = {f.name: f for f in (
    Family("captioner", "captioning", "val/cider", "max", "pipeline.training.modules:CaptioningModule",
           "pipeline.params:CaptionerParams", "pipeline.params:CaptionerTrainParams", extra_epochs="scst_epochs"),
    Family("lstm_lm", "language_model", "val/loss", "min", "pipeline.training.modules:LanguageModelModule",
           "pipeline.params:LstmLmParams", "pipeline.params:LstmLmTrainParams", carries_state=True),
    Family("transformer_lm", "language_model", "val/loss", "min", "pipeline.training.modules:LanguageModelModule",
           "pipeline.params:TransformerLmParams", "pipeline.params:TransformerLmTrainParams"),
)}


def plugins(entry_points: Any = None) -> dict[str, Family]:
    """The families other installed packages register (entry-point group capline.families).

    A plug-in that fails to load or is not a valid record is left out with a warning naming its entry point:
    one broken package does not take the built-in families down with it.
    """
    found: dict[str, Family] = {}
    for ep in entry_points if entry_points is not None else importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            record = _checked(ep.load(), found)
        except Exception as err:  # whatever the plug-in's import raises
            log.warning("model family plug-in %s = %s (entry points %s) left out: %s", ep.name, ep.value,
                        ENTRY_POINTS, err)
            continue
        found[record.name] = record
    return found


def _checked(record: Any, found: dict[str, Family]) -> Family:
    """`record` if it is a Family whose name is a free identifier; TypeError/ValueError saying why not."""
    if not isinstance(record, Family):
        raise TypeError(f"expected a pipeline.families.Family record, got {type(record).__name__}")
    if not record.name.isidentifier():
        raise ValueError(f"family name {record.name!r} must be an identifier (it names params sections)")
    if record.name in BUILT_IN or record.name in found:
        raise ValueError(f"a model family named {record.name!r} is already registered")
    return record


def family(name: str) -> Family:
    """The record of `name`; ValueError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


FAMILIES: dict[str, Family] = dict(BUILT_IN)
FAMILIES.update(plugins())  # last: a plug-in's module may import this one's Family
LANGUAGE_MODELS = tuple(name for name, f in FAMILIES.items() if f.task == "language_model")
