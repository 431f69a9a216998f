"""LightningModules: one for captioning, one for language modelling.

Each rebuilds its network from plain hyperparameters (the model's params section as a dict, the
vocabulary size), so `load_from_checkpoint(path, weights_only=True)` needs nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.optim.lr_scheduler import LambdaLR

from pipeline.data.vocab import Vocabulary
from pipeline.decoding import greedy
from pipeline.families import family as family_record
from pipeline.metrics import caption_scores
from pipeline.models.captioners import build_captioner
from pipeline.models.language_models import build_language_model, detach_state
from pipeline.params import CaptionerParams, CaptionerTrainParams, OptimParams
from pipeline.tokens import PAD_ID
from pipeline.training.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from pipeline.training.scst import CiderD, sample_with_logprobs, scst_loss


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy over non-pad targets. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing)


def gather_dicts(part: dict) -> dict:
    """The union of every DDP rank's dict (this process's dict when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(part)
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    merged: dict = {}
    for other in parts:
        merged.update(other)
    return merged


def exempt_from_weight_decay(module: torch.nn.Module) -> set[int]:
    """ids of the parameters weight decay leaves alone: every tensor of fewer than two dimensions (biases,
    LayerNorm/BatchNorm gains) and every nn.Embedding table (tokens, learned positions; a tied output head is
    the token table, so it is exempt too). What decays are the weight matrices of Linear, convolution and
    recurrent layers (Loshchilov & Hutter's AdamW applied as in minGPT)."""
    exempt = {id(p) for p in module.parameters() if p.ndim < 2}
    return exempt | {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}


def split_weight_decay(groups: list[dict], exempt: set[int]) -> list[dict]:
    """Each group as two: its decayed parameters, and its exempt ones with "weight_decay": 0.0; every other key
    of the group (its own lr) goes with both, and an empty half is left out."""
    out = []
    for group in groups:
        decayed = [p for p in group["params"] if id(p) not in exempt]
        kept = [p for p in group["params"] if id(p) in exempt]
        out += [{**group, "params": decayed}] if decayed else []
        out += [{**group, "params": kept, "weight_decay": 0.0}] if kept else []
    return out


def floored_factor(cfg: OptimParams, steps_per_epoch: int, floor: float) -> Callable[[int], float]:
    """lr_factor with its decay ending at `floor` x lr instead of 0: the warm-up as it is, then
    floor + (1 - floor) x the decay (nanoGPT's cosine from lr to min_lr)."""
    factor = lr_factor(cfg, steps_per_epoch)
    warmup = warmup_steps(cfg, max(1, cfg.max_epochs * steps_per_epoch))

    def floored(step: int) -> float:
        return factor(step) if step < warmup else floor + (1.0 - floor) * factor(step)

    return floored


class _Optimised(pl.LightningModule):
    """Shared optimiser/scheduler set-up from a family's train section."""

    train_cfg: OptimParams

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def optimizer_groups(self) -> list[dict]:
        """param_groups() with train.<family>.weight_decay on weight matrices only (exempt_from_weight_decay);
        at weight_decay 0 the groups as they are."""
        groups = self.param_groups()
        if self.train_cfg.weight_decay == 0:
            return groups
        return split_weight_decay(groups, exempt_from_weight_decay(self))

    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.optimizer_groups(), self.train_cfg, self.device.type)
        steps = max(1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer, steps)}

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> dict:
        """build_scheduler's per-step schedule; a cosine with a min_lr_fraction (train.transformer_lm) ends there."""
        floor = getattr(self.train_cfg, "min_lr_fraction", 0.0)
        if not floor or self.train_cfg.schedule != "cosine":
            return build_scheduler(optimizer, self.train_cfg, steps_per_epoch)
        return {"scheduler": LambdaLR(optimizer, floored_factor(self.train_cfg, steps_per_epoch, floor)),
                "interval": "step"}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip here under bf16: Lightning refuses to clip for a fused (CUDA) Adam under any AMP precision."""
        # bf16-mixed has no loss scaler, so the gradients are already true gradients and plain clipping is
        # exact; under 16-mixed the GradScaler's rules apply, so that stays with Lightning
        if self.trainer.precision != "bf16-mixed":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


class CaptioningModule(_Optimised):
    """Teacher-forced training of a captioner, then any scst_epochs of SCST; validation scores greedy BLEU-4, CIDEr.

    no_repeat_ngram: evaluate.no_repeat_ngram, the n-gram block of validation's greedy decoding (so that val/cider
    scores captions as evaluation makes them); 0 (off) for checkpoints saved before it existed.
    """

    def __init__(self, model: dict[str, Any], train: dict[str, Any], vocab_tokens: list[str],
                 image_size: int, embeddings: np.ndarray | None = None, no_repeat_ngram: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["embeddings"])
        self.model_cfg = CaptionerParams.model_validate(model)
        if not isinstance(self.model_cfg.max_len, int):  # decoding needs the number (fit.caption_max_len)
            raise ValueError(f"models.captioner.max_len: a number of tokens, got {self.model_cfg.max_len!r}")
        self.train_cfg = CaptionerTrainParams.model_validate(train)
        self.vocab_tokens = vocab_tokens
        self.vocab = Vocabulary(vocab_tokens)
        self.model = build_captioner(self.model_cfg, len(vocab_tokens), embeddings)
        self._val_hyps: dict[int, str] = {}
        self._cider: CiderD | None = None  # built at the first self-critical step (training references)

    def param_groups(self) -> list[dict]:
        """Encoder parameters (when any are trainable) get their own learning rate."""
        enc = self.model.encoder_parameters()
        enc_ids = {id(p) for p in enc}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in enc_ids]
        groups = [{"params": rest}]
        if enc and self.model_cfg.freeze_encoder:
            groups.append({"params": enc, "lr": self.model_cfg.encoder_lr})
        elif enc:
            groups[0]["params"] = rest + enc
        return groups

    def sampling_probability(self) -> float:
        """Scheduled-sampling probability for this epoch: linear from first to last epoch."""
        start, end = self.train_cfg.scheduled_sampling
        last = max(1, self.train_cfg.max_epochs - 1)
        return start + (end - start) * min(1.0, self.current_epoch / last)

    def _mix_inputs(self, memory: torch.Tensor, inputs: torch.Tensor, prob: float) -> torch.Tensor:
        """Replace gold input words by the model's own predictions with probability `prob`.

        Parallel scheduled sampling (Duckworth et al. 2019): one teacher-forced pass gives the
        predictions, so it works for every architecture, including those that run the whole
        sequence at once.
        """
        with torch.no_grad():
            logits, _ = self.model(memory, inputs)  # (B, T, V)
        predicted = logits.argmax(-1)[:, :-1]  # prediction for position t+1 made at t
        swap = torch.rand(predicted.shape, device=inputs.device) < prob
        swap &= inputs[:, 1:] != PAD_ID
        mixed = inputs.clone()
        mixed[:, 1:] = torch.where(swap, predicted, inputs[:, 1:])
        return mixed

    def _loss(self, memory: torch.Tensor, captions: torch.Tensor, stage: str, prob: float = 0.0) -> torch.Tensor:
        """The objective: cross-entropy plus λ × the attention penalty; each logged on its own under `stage`/."""
        inputs, targets = captions[:, :-1], captions[:, 1:]  # (B, T)
        if prob > 0:
            inputs = self._mix_inputs(memory, inputs, prob)
        logits, aux = self.model(memory, inputs)
        loss = sequence_loss(logits, targets, self.train_cfg.label_smoothing if self.training else 0.0)
        # {stage}/loss is the cross-entropy alone: comparable across runs whatever their regularisers
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(captions), sync_dist=stage == "val")
        if "alphas" in aux and self.model_cfg.attention_reg > 0:
            mask = (targets != PAD_ID).float()  # (B, T): attention at padded steps does not count
            penalty = self.model.doubly_stochastic_penalty(aux["alphas"], mask)
            self.log(f"{stage}/attention_penalty", penalty, batch_size=len(captions), sync_dist=stage == "val")
            loss = loss + self.model_cfg.attention_reg * penalty
        return loss

    def encode_batch(self, batch: dict) -> torch.Tensor:
        """Memory, one row per caption, from the batch's pre-extracted "features" (the frozen CNN skipped) or
        its "images"; training batches hold each image once and map captions to it with "image_slot"."""
        if "features" in batch:
            memory = self.model.encode_features(batch["features"].float())  # stored float16 (U, C, h, w)
        else:
            memory = self.model.encode(batch["images"])  # (U, ...)
        return memory if "image_slot" not in batch else memory.index_select(0, batch["image_slot"])  # (B, ...)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        memory = self.encode_batch(batch)
        if self.self_critical():
            return self._scst_loss(memory, batch["image_index"])
        prob = self.sampling_probability()
        loss = self._loss(memory, batch["captions"], "train", prob)
        self.log("train/sampling_prob", prob, batch_size=len(batch["captions"]))
        return loss

    def self_critical(self) -> bool:
        """Whether this epoch is self-critical: the scst_epochs come after max_epochs of cross-entropy.

        A function of the epoch alone, so a resumed run is in the same phase as the one it continues.
        """
        return self.current_epoch >= self.train_cfg.max_epochs

    def _scst_loss(self, memory: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """SCST (Rennie et al. 2017): a sampled caption per row, rewarded by its CIDEr-D minus the greedy one's.

        Both are scored against every training reference of the row's image. No cross-entropy is computed in
        these epochs, so train/loss is not logged; the objective is train/scst_loss.
        """
        if self._cider is None:  # document frequencies over all training references, counted once
            self._cider = CiderD(self.trainer.datamodule.references("train"))
        images, max_len = image_index.tolist(), self.model_cfg.max_len
        sampled, logprob = sample_with_logprobs(self.model, memory, max_len)  # logprob (B,) with grad
        # the model's own argmax, without validation's n-gram block: nearer the samples' rewards, so less variance
        # (default data, 3 SCST epochs: best val/cider 2.82 and 2.83 in two runs, 2.70 with the block)
        baseline = greedy(self.model, memory.detach(), len(images), max_len).tokens
        reward = torch.tensor(self._cider.scores(self._texts(sampled), images), dtype=torch.float32,
                              device=logprob.device)  # (B,)
        base = torch.tensor(self._cider.scores(self._texts(baseline), images), dtype=torch.float32,
                            device=logprob.device)  # (B,)
        loss = scst_loss(logprob, reward, base)
        n = len(images)
        self.log("train/scst_loss", loss, prog_bar=True, batch_size=n)
        self.log("train/scst_reward", reward.mean(), prog_bar=True, batch_size=n)
        self.log("train/scst_baseline", base.mean(), batch_size=n)
        return loss

    def _texts(self, captions: list[list[int]]) -> list[str]:
        return [" ".join(self.vocab_tokens[t] for t in tokens) for tokens in captions]

    def on_validation_epoch_start(self) -> None:
        self._val_hyps = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        memory = self.encode_batch(batch)
        captions = self._reference_batch(batch["image_index"]).to(self.device)
        self._loss(memory, captions, "val")
        result = greedy(self.model, memory, len(captions), self.model_cfg.max_len,
                        no_repeat_ngram=self.hparams["no_repeat_ngram"])
        for idx, tokens in zip(batch["image_index"].tolist(), result.tokens, strict=True):
            self._val_hyps[idx] = " ".join(self.vocab_tokens[t] for t in tokens)

    def _reference_batch(self, image_index: torch.Tensor) -> torch.Tensor:
        """First reference caption of each image as a padded id batch (B, T) for the validation loss."""
        dm = self.trainer.datamodule
        refs = dm.references("val")
        # encoded exactly like a training caption: <start>, words cut to max_len, <end>
        rows = [torch.tensor(dm.encode(refs[i][0].split())) for i in image_index.tolist()]
        return pad_sequence(rows, batch_first=True, padding_value=PAD_ID)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        hyps = gather_dicts(self._val_hyps)  # under DDP each rank decoded only its share of the images
        if not hyps:
            return
        refs = self.trainer.datamodule.references("val")
        scores = caption_scores({i: refs[i] for i in hyps}, hyps, meteor=False)
        # every rank scored the same hypotheses: the values agree, sync_dist only keeps Lightning's check quiet
        self.log("val/bleu_4", scores["bleu_4"], sync_dist=True)
        self.log("val/cider", scores["cider"], prog_bar=True, sync_dist=True)


class LanguageModelModule(_Optimised):
    """Next-token training; an RNN's hidden state is carried across batches (truncated BPTT)."""

    def __init__(self, family: str, model: dict[str, Any], train: dict[str, Any], vocab_tokens: list[str],
                 embeddings: np.ndarray | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["embeddings"])
        record = family_record(family)  # its own params sections, as its registered schemas type them
        self.model_cfg = record.schema("models").model_validate(model)
        self.train_cfg = record.schema("train").model_validate(train)
        self.carry_state = record.carries_state
        self.vocab_tokens = vocab_tokens
        self.vocab = Vocabulary(vocab_tokens)
        self.model = self.build_model(family, len(vocab_tokens), embeddings)
        self._state: dict[str, Any] = {"train": None, "val": None}

    def build_model(self, family: str, vocab_size: int, embeddings: np.ndarray | None) -> torch.nn.Module:
        """The network: (None, inputs (B, T), state) -> (logits (B, T, V), state). A plug-in family overrides it."""
        return build_language_model(family, self.model_cfg, vocab_size, embeddings)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        state = self._state[stage] if self.carry_state else None
        logits, state = self.model(None, batch["inputs"], state)
        if self.carry_state:
            self._state[stage] = detach_state(state)  # truncated BPTT: no gradient across batches
        smoothing = self.train_cfg.label_smoothing if stage == "train" else 0.0
        loss = sequence_loss(logits, batch["targets"], smoothing)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch["targets"].numel(),
                 sync_dist=stage == "val")  # the epoch's validation loss is averaged over DDP ranks
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        if self.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 0:
            self._state["train"] = None  # a new pass over the stream starts from a zero state

    def on_validation_epoch_start(self) -> None:
        self._state["val"] = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the carried hidden state so a mid-epoch resume continues exactly."""
        checkpoint["carried_state"] = self._state["train"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._state["train"] = checkpoint.get("carried_state")
