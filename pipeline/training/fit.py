"""Fit a model family: build data, module, callbacks, logger and Trainer from params; run; report."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from pipeline.data.vocab import Vocabulary
from pipeline.families import FAMILIES
from pipeline.families import family as family_record
from pipeline.io import read_json
from pipeline.params import Params
from pipeline.training.callbacks import EpochHistory, EpochLine, NonFiniteLossGuard, RNGStateCallback
from pipeline.training.checkpoints import checkpoint_path, resume_from
from pipeline.training.datamodules import CaptionDataModule, LanguageModelDataModule
from pipeline.training.features import check_manifest


@dataclasses.dataclass
class TrainResult:
    """What a fit produced."""

    family: str
    best_checkpoint: str
    last_checkpoint: str
    monitor: str
    best_score: float
    epochs: int
    steps: int
    run_id: str | None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def vocabulary(p: Params, family: str) -> Vocabulary:
    """The vocabulary a family models: words for captions, chars or words for language models."""
    level = getattr(getattr(p.models, family), "level", "word")  # a captioner's captions are words
    return Vocabulary.load(Path(p.paths.vocab) / ("words.json" if level == "word" else "chars.json"))


def pretrained_embeddings(p: Params, family: str) -> np.ndarray | None:
    """The embeddings stage's vectors when the family asks for them (word level only)."""
    section = getattr(p.models, family)
    if not section.pretrained_embeddings:
        return None
    if getattr(section, "level", "word") != "word":
        raise ValueError(f"models.{family}.pretrained_embeddings needs level: word (got {section.level})")
    path = Path(p.paths.embeddings) / "words.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the embeddings stage: dvc repro embeddings)")
    return np.load(path)


def caption_max_len(p: Params) -> int:
    """models.captioner.max_len, with `auto` read as the 99th percentile of the training captions' lengths."""
    max_len = p.models.captioner.max_len
    if max_len != "auto":
        return max_len
    manifest = Path(p.paths.coco) / "manifest.json"
    lengths = read_json(manifest).get("train_caption_tokens", {}) if manifest.is_file() else {}
    if not isinstance(lengths.get("p99"), int):
        raise ValueError(f"{manifest}: no train_caption_tokens.p99 for models.captioner.max_len: auto "
                         "(rerun prepare_coco: dvc repro prepare_coco, or give max_len a number)")
    return max(2, lengths["p99"])


def run_params(p: Params, family: str) -> dict[str, Any]:
    """What a run of `family` logs as MLflow params, once: the seed, its own model and train sections, the
    shared train settings (and for a captioner the n-gram block its validation decodes with)."""
    train = p.train.model_dump()
    out: dict[str, Any] = {"seed": p.seed, "models": {family: getattr(p.models, family).model_dump()},
                           "train": {**{k: v for k, v in train.items() if k not in FAMILIES}, family: train[family]}}
    if family_record(family).captions:  # its validation decodes captions as evaluation does
        out["evaluate"] = {"no_repeat_ngram": p.evaluate.no_repeat_ngram}
    return out


def data_paths(p: Params, family: str) -> list[str]:
    """The prepared data a run of `family` reads, as build_datamodule and build_module read it: what its MLflow
    run logs as dataset inputs (with their DVC hashes)."""
    if family_record(family).captions:
        paths = [p.paths.coco, p.paths.vocab, *([p.paths.features] if p.features.enabled else [])]
    else:
        paths = [p.paths.encoded, p.paths.vocab]
    return paths + ([p.paths.embeddings] if getattr(p.models, family).pretrained_embeddings else [])


def build_datamodule(p: Params, family: str, vocab: Vocabulary, use_features: bool = True) -> pl.LightningDataModule:
    """The data module of a family over the prepared data (a captioner's on pre-extracted features if enabled;
    use_features=False for evaluation, which runs the checkpoint's own encoder on the raw images)."""
    cfg, fam = getattr(p.train, family), family_record(family)
    if fam.captions:
        features = None
        if p.features.enabled and use_features:  # stale features (another encoder, other images) stop here
            check_manifest(p.paths.features, p.models.captioner, p.paths.coco, p.features.dtype)
            features = p.paths.features
        return CaptionDataModule(p.paths.coco, vocab, cfg.batch_size, caption_max_len(p),
                                 p.train.num_workers, p.seed, bucket=p.train.bucket_by_length, features_dir=features,
                                 group_by_image=p.train.group_by_image)
    model = getattr(p.models, family)
    # a carried RNN state needs one stream cut into bptt pieces; attention sees windows of its context
    seq_len = cfg.bptt if fam.carries_state else model.context
    mode = "stream" if fam.carries_state else "windows"
    return LanguageModelDataModule(p.paths.encoded, model.level, cfg.batch_size, seq_len, mode, p.seed,
                                   p.train.num_workers)


def check_epoch_fraction(p: Params, family: str, dm: pl.LightningDataModule) -> None:
    """An epoch of train.<family>.epoch_fraction must hold one batch at least (ValueError naming the keys)."""
    cfg = getattr(p.train, family)
    batches = len(dm.train_dataloader())  # this process's share under DDP; Lightning builds its own loader later
    keys = f"train.{family}.epoch_fraction (sweep.{family}.epoch_fraction in a sweep)"
    if not batches:
        raise ValueError(f"train.{family}: the training data gives no batch of train.{family}.batch_size "
                         f"{cfg.batch_size} at all; lower train.{family}.batch_size")
    if int(batches * cfg.epoch_fraction) < 1:  # Lightning's rounding of limit_train_batches
        need = min(1.0, math.ceil(1e4 / batches) / 1e4)
        raise ValueError(f"{keys} is {cfg.epoch_fraction:g}: less than one of the {batches} training batches per "
                         f"epoch; raise it to at least {need:g} or lower train.{family}.batch_size "
                         f"({cfg.batch_size})")


def build_module(p: Params, family: str, vocab: Vocabulary, dm: pl.LightningDataModule) -> pl.LightningModule:
    """A fresh LightningModule for a family (weights from the embeddings stage when asked).

    First the data are checked to give an epoch of one batch at least: a sweep trial and `capline train` both
    build their module here, so a too small epoch_fraction stops them before any work.
    """
    check_epoch_fraction(p, family, dm)
    embeddings = pretrained_embeddings(p, family)
    model_cfg = getattr(p.models, family).model_dump()
    if family_record(family).captions:  # the checkpoint keeps the number `auto` stood for: decoding needs no data
        model_cfg["max_len"] = caption_max_len(p)
    train_cfg = getattr(p.train, family).model_dump()
    cls = family_record(family).lightning_module()
    if family_record(family).captions:
        dm.setup("fit")
        return cls(model_cfg, train_cfg, vocab.tokens, dm.image_size, embeddings,
                   p.evaluate.no_repeat_ngram)  # validation decodes as evaluation does
    return cls(family, model_cfg, train_cfg, vocab.tokens, embeddings)


def precision(p: Params) -> str:
    """`auto`: bf16 autocast on a GPU, full fp32 on a CPU."""
    if p.train.precision != "auto":
        return p.train.precision
    gpu = p.train.accelerator != "cpu" and torch.cuda.is_available()
    return "bf16-mixed" if gpu else "32-true"


def build_trainer(p: Params, family: str, logger: Any = None, callbacks: list | None = None,
                  checkpoint_dir: str | Path | None = None, **overrides: Any) -> pl.Trainer:
    """A Trainer with checkpointing, early stopping, the non-finite guard and RNG-exact resume.

    Checkpoints go to `checkpoint_dir` (default: the family's folder under paths.models; a sweep trial
    passes its own scratch folder).
    """
    cfg, fam = getattr(p.train, family), family_record(family)
    monitor, mode = fam.monitor, fam.mode
    folder = checkpoint_dir or checkpoint_path(p, family).parent
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor, mode=mode, enable_version_counter=False)
    # Lightning 2.6's save_last writes last.ckpt only in epochs that improved the monitor; resuming needs every
    # epoch, so last.ckpt has its own callback (no monitor, top 1: the newest epoch overwrites it).
    last = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False)
    history = EpochHistory(monitor)
    cbs = [best, last, NonFiniteLossGuard(f"lower train.{family}.lr or set train.{family}.clip_grad_norm"),
           RNGStateCallback(), history, *(callbacks or [])]
    if not sys.stdout.isatty() or overrides.get("enable_progress_bar") is False:  # a log, `dvc repro`: plain lines
        cbs.append(EpochLine(f"train {family}", history))
        overrides.setdefault("enable_progress_bar", False)
    if cfg.early_stopping_patience:
        cbs.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience))
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="epoch"))
    epochs = fam.epochs(cfg)  # a captioner's self-critical epochs come after its max_epochs of cross-entropy
    kwargs: dict[str, Any] = {
        "accelerator": p.train.accelerator, "devices": p.train.devices, "precision": precision(p),
        "max_epochs": epochs, "limit_train_batches": cfg.epoch_fraction,
        "gradient_clip_val": cfg.clip_grad_norm or None,
        "log_every_n_steps": p.train.log_every_n_steps, "callbacks": cbs, "logger": logger or False,
        "deterministic": False, "enable_model_summary": False, **overrides}
    return pl.Trainer(**kwargs)


def train(p: Params, family: str, *, resume: bool | str | Path = False, logger: Any = None,
          **trainer_overrides: Any) -> TrainResult:
    """Fit `family` from params, logging to `logger` (a Lightning logger, e.g. the caller's MLflow run).

    `resume=True` continues from the family's last.ckpt when there is one (best.ckpt if last.ckpt is
    damaged; see resume_from); a path resumes from that checkpoint. Either way optimiser, scheduler, RNG
    states and the data position are restored.
    """
    fam = family_record(family)
    ckpt_path = resume_from(p, family, resume)  # first: a damaged checkpoint stops the run before any work
    pl.seed_everything(p.seed, workers=True, verbose=False)
    vocab = vocabulary(p, family)
    dm = build_datamodule(p, family, vocab)
    module = build_module(p, family, vocab, dm)
    if p.train.compile:
        module.model.compile()  # in place: state_dict keys stay the same, checkpoints stay portable
    trainer = build_trainer(p, family, logger=logger, **trainer_overrides)
    last = checkpoint_path(p, family, "last")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    ckpt_cb = trainer.checkpoint_callback
    best = str(checkpoint_path(p, family, "best")) if ckpt_cb.best_model_path else str(last)  # as params give it
    score = ckpt_cb.best_model_score
    history = next(cb.history for cb in trainer.callbacks if isinstance(cb, EpochHistory))
    return TrainResult(family, best, str(last), fam.monitor, float(score) if score is not None else float("nan"),
                       trainer.current_epoch, trainer.global_step, getattr(logger, "run_id", None), history)
