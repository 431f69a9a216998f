"""Fit a model family: build data, module, callbacks, logger and Trainer from params; run; report."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from pipeline.data.features import check_manifest
from pipeline.data.vocab import Vocabulary
from pipeline.params import Params
from pipeline.training.callbacks import EpochHistory, EpochLine, NonFiniteLossGuard, RNGStateCallback
from pipeline.training.datamodules import CaptionDataModule, LanguageModelDataModule
from pipeline.training.modules import CaptioningModule, LanguageModelModule

log = logging.getLogger(__name__)

FAMILIES = ("captioner", "lstm_lm", "transformer_lm")
MONITOR = {"captioner": ("val/cider", "max"), "lstm_lm": ("val/loss", "min"),
           "transformer_lm": ("val/loss", "min")}


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


def checkpoint_path(p: Params, family: str, which: str = "best") -> Path:
    """Where `capline train` keeps a family's best/last checkpoint."""
    return Path(p.paths.models) / family / f"{which}.ckpt"


def vocabulary(p: Params, family: str) -> Vocabulary:
    """The vocabulary a family models: words for captions, chars or words for language models."""
    level = "word" if family == "captioner" else getattr(p.models, family).level
    return Vocabulary.load(Path(p.paths.vocab) / ("words.json" if level == "word" else "chars.json"))


def pretrained_embeddings(p: Params, family: str) -> np.ndarray | None:
    """The embeddings stage's vectors when the family asks for them (word level only)."""
    section = getattr(p.models, family)
    if not section.pretrained_embeddings:
        return None
    if family != "captioner" and section.level != "word":
        raise ValueError(f"models.{family}.pretrained_embeddings needs level: word (got {section.level})")
    path = Path(p.paths.embeddings) / "words.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the embeddings stage: dvc repro embeddings)")
    return np.load(path)


def run_params(p: Params, family: str) -> dict[str, Any]:
    """What a run of `family` logs as MLflow params, once: the seed, its own model and train sections, the
    shared train settings (and for a captioner the n-gram block its validation decodes with)."""
    train = p.train.model_dump()
    out: dict[str, Any] = {"seed": p.seed, "models": {family: getattr(p.models, family).model_dump()},
                           "train": {**{k: v for k, v in train.items() if k not in FAMILIES}, family: train[family]}}
    if family == "captioner":
        out["evaluate"] = {"no_repeat_ngram": p.evaluate.no_repeat_ngram}
    return out


def build_datamodule(p: Params, family: str, vocab: Vocabulary, use_features: bool = True) -> pl.LightningDataModule:
    """The data module of a family over the prepared data (a captioner's on pre-extracted features if enabled;
    use_features=False for evaluation, which runs the checkpoint's own encoder on the raw images)."""
    cfg = getattr(p.train, family)
    if family == "captioner":
        features = None
        if p.features.enabled and use_features:  # stale features (another encoder, other images) stop here
            check_manifest(p.paths.features, p.models.captioner, p.paths.coco, p.features.dtype)
            features = p.paths.features
        return CaptionDataModule(p.paths.coco, vocab, cfg.batch_size, p.models.captioner.max_len,
                                 p.train.num_workers, p.seed, bucket=p.train.bucket_by_length, features_dir=features,
                                 group_by_image=p.train.group_by_image)
    model = getattr(p.models, family)
    seq_len = cfg.bptt if family == "lstm_lm" else model.context
    mode = "stream" if family == "lstm_lm" else "windows"
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
    train_cfg = getattr(p.train, family).model_dump()
    if family == "captioner":
        dm.setup("fit")
        return CaptioningModule(model_cfg, train_cfg, vocab.tokens, dm.image_size, embeddings,
                                p.evaluate.no_repeat_ngram)  # validation decodes as evaluation does
    return LanguageModelModule(family, model_cfg, train_cfg, vocab.tokens, embeddings)


def learning_curve(checkpoint: str | Path) -> list[dict[str, float]]:
    """The per-epoch history stored in a checkpoint by EpochHistory (empty for foreign checkpoints)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return list(ckpt.get("callbacks", {}).get("EpochHistory", {}).get("history", []))


def load_module(family: str, checkpoint: str | Path, device: str = "cpu") -> pl.LightningModule:
    """A trained module from a checkpoint (weights_only: checkpoints never unpickle code)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint (train first: capline train {family})")
    checkpoint_step(checkpoint)  # a truncated or foreign file: an error naming it, not torch's zip message
    cls = CaptioningModule if family == "captioner" else LanguageModelModule
    module = cls.load_from_checkpoint(checkpoint, map_location=device, weights_only=True,
                                      embeddings=embedding_placeholder(checkpoint))
    return module.eval()


def embedding_placeholder(checkpoint: Path) -> np.ndarray | None:
    """Zeros (V, E) for a model trained from pretrained vectors: its own trained ones come from the state_dict."""
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
    model = hparams.get("model", {})
    if not model.get("pretrained_embeddings"):
        return None
    width = model.get("embed_size", model.get("d_model"))
    return np.zeros((len(hparams["vocab_tokens"]), width), dtype=np.float32)


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at; ValueError naming the file when it is damaged."""
    try:  # mmap: the check reads the archive's index, not every tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated/corrupt/unsafe files raise RuntimeError, EOFError, UnpicklingError...
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("global_step"), int):
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict or global_step)")
    return ckpt["global_step"]


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
    cfg = getattr(p.train, family)
    monitor, mode = MONITOR[family]
    folder = checkpoint_dir or checkpoint_path(p, family).parent
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor, mode=mode, enable_version_counter=False)
    # Lightning 2.6's save_last writes last.ckpt only in epochs that improved the monitor; resuming needs every
    # epoch, so last.ckpt has its own callback (no monitor, top 1: the newest epoch overwrites it).
    last = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False)
    history = EpochHistory(monitor)
    cbs = [best, last, NonFiniteLossGuard(f"lower train.{family}.lr or set train.{family}.clip_grad_norm"),
           RNGStateCallback(), history, *(callbacks or [])]
    if not sys.stdout.isatty():  # a log file or `dvc repro`: plain lines instead of a progress bar
        cbs.append(EpochLine(f"train {family}", history))
        overrides.setdefault("enable_progress_bar", False)
    if cfg.early_stopping_patience:
        cbs.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience))
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="epoch"))
    # a captioner's self-critical epochs come after its max_epochs of cross-entropy (a sweep trial's too)
    epochs = cfg.max_epochs + (cfg.scst_epochs if family == "captioner" else 0)
    kwargs: dict[str, Any] = {
        "accelerator": p.train.accelerator, "devices": p.train.devices, "precision": precision(p),
        "max_epochs": epochs, "limit_train_batches": cfg.epoch_fraction,
        "gradient_clip_val": cfg.clip_grad_norm or None,
        "log_every_n_steps": p.train.log_every_n_steps, "callbacks": cbs, "logger": logger or False,
        "deterministic": False, "enable_model_summary": False, **overrides}
    return pl.Trainer(**kwargs)


def train(p: Params, family: str, *, resume: bool | str | Path = False, logger: bool = True,
          **trainer_overrides: Any) -> TrainResult:
    """Fit `family` from params.

    `resume=True` continues from the family's last.ckpt when there is one (best.ckpt if last.ckpt is
    damaged; see resume_from); a path resumes from that checkpoint. Either way optimiser, scheduler, RNG
    states and the data position are restored.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    ckpt_path = resume_from(p, family, resume)  # first: a damaged checkpoint stops the run before any work
    pl.seed_everything(p.seed, workers=True, verbose=False)
    vocab = vocabulary(p, family)
    dm = build_datamodule(p, family, vocab)
    module = build_module(p, family, vocab, dm)
    mlf = None
    if logger:
        from pipeline import tracking  # only when tracking: GPU boxes without mlflow can still train

        mlf = tracking.lightning_logger(p.tracking.uri, p.tracking.experiment, run_name=f"train-{family}",
                                        tags={"family": family, "params_hash": tracking.params_hash(p.to_dict()),
                                              **tracking.lineage_tags(Path.cwd())})
        tracking.log_params_flat(mlf.run_id, run_params(p, family))
    if p.train.compile:
        module.model.compile()  # in place: state_dict keys stay the same, checkpoints stay portable
    trainer = build_trainer(p, family, logger=mlf, **trainer_overrides)
    last = checkpoint_path(p, family, "last")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    ckpt_cb = trainer.checkpoint_callback
    best = str(checkpoint_path(p, family, "best")) if ckpt_cb.best_model_path else str(last)  # as params give it
    run_id = mlf.run_id if mlf else None
    if run_id and Path(best).is_file():
        from pipeline import tracking

        tracking.log_artifact(run_id, best, "checkpoints")
    score = ckpt_cb.best_model_score
    history = next(cb.history for cb in trainer.callbacks if isinstance(cb, EpochHistory))
    return TrainResult(family, best, str(last), MONITOR[family][0],
                       float(score) if score is not None else float("nan"),
                       trainer.current_epoch, trainer.global_step, run_id, history)
