"""Checkpoints of the fit loop: where they live, which to resume from, and loading one for inference."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.families import family as family_record
from pipeline.models.ensemble import CaptionerEnsemble
from pipeline.params import Params

log = logging.getLogger(__name__)


def checkpoint_path(p: Params, family: str, which: str = "best") -> Path:
    """Where `capline train` keeps a family's best/last checkpoint."""
    return Path(p.paths.models) / family / f"{which}.ckpt"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's dict (tensors memory-mapped); ValueError naming the file when it is damaged."""
    try:  # mmap: the archive's index is read, a tensor's bytes only when used
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated/corrupt/unsafe files raise RuntimeError, EOFError, UnpicklingError...
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("global_step"), int):
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict or global_step)")
    return ckpt


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at; ValueError naming the file when it is damaged."""
    return read_checkpoint(path)["global_step"]


def load_module(family: str, checkpoint: str | Path, device: str = "cpu", missing: str | None = None
                ) -> pl.LightningModule:
    """A trained module from a checkpoint (weights_only: checkpoints never unpickle code); `missing`: what the
    error for an absent file says after its name (default: train first)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint ({missing or f'train first: capline train {family}'})")
    hparams = read_checkpoint(checkpoint).get("hyper_parameters", {})  # a damaged file: an error naming it
    cls = family_record(family).lightning_module()
    module = cls.load_from_checkpoint(checkpoint, map_location=device, weights_only=True,
                                      embeddings=embedding_placeholder(hparams))
    return module.eval()


def captioner_ensemble(module: pl.LightningModule, extra: list[str], checkpoint: str | Path,
                       listed_in: str = "evaluate.captioner_ensemble") -> CaptionerEnsemble | None:
    """The module's captioner decoded together with those of the `extra` checkpoints (named in errors as
    listed in `listed_in`); None without any."""
    if not extra:
        return None
    members = [module.model]
    for path in extra:
        other = load_module("captioner", path, str(module.device), missing=f"listed in {listed_in}")
        if other.vocab_tokens != module.vocab_tokens:
            raise ValueError(f"{listed_in}: {path} was trained on another vocabulary than "
                             f"{checkpoint} (ensemble members need the same vocab stage output)")
        members.append(other.model)
    return CaptionerEnsemble(members).eval()


def embedding_placeholder(hparams: dict[str, Any]) -> np.ndarray | None:
    """Zeros (V, E) for a model trained from pretrained vectors: its own trained ones come from the state_dict."""
    model = hparams.get("model", {})
    if not model.get("pretrained_embeddings"):
        return None
    width = model.get("embed_size", model.get("d_model"))
    return np.zeros((len(hparams["vocab_tokens"]), width), dtype=np.float32)


def learning_curve(checkpoint: str | Path) -> list[dict[str, float]]:
    """The per-epoch history stored in a checkpoint by EpochHistory (empty for foreign checkpoints)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return list(ckpt.get("callbacks", {}).get("EpochHistory", {}).get("history", []))


def resume_from(p: Params, family: str, resume: bool | str | Path) -> str | None:
    """The checkpoint to resume from: a given path (checked), or the newest readable of last/best.ckpt.

    A damaged last.ckpt (e.g. cut short by a full disk or a kill during a copy) is skipped with a warning
    naming it; best.ckpt, an earlier epoch, is then the previous good state. None: start afresh.
    """
    if resume is False:
        return None
    if resume is not True:
        checkpoint_step(resume)
        return str(resume)
    good, bad = [], []
    for path in (checkpoint_path(p, family, "last"), checkpoint_path(p, family, "best")):
        if not path.is_file():
            continue
        try:
            good.append((checkpoint_step(path), str(path)))
        except ValueError as err:
            log.warning("%s; falling back to the previous good checkpoint", err)
            bad.append(str(err))
    if not good and bad:
        raise ValueError(f"cannot resume {family}: no readable checkpoint ({'; '.join(bad)}); "
                         "train without --resume to start over")
    if not good:
        return None
    step, path = max(good, key=lambda g: g[0])  # last.ckpt first: it wins a tie
    if bad:
        log.warning("resuming %s from %s (step %d)", family, path, step)
    return path
