"""Optimisers and learning-rate schedules, built from a family's `train` section."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.params import CaptionerTrainParams, OptimParams


def build_optimizer(param_groups: Iterable[dict], cfg: OptimParams, device_type: str = "cpu"
                    ) -> torch.optim.Optimizer:
    """Adam, AdamW, SGD with momentum or RMSProp over parameter groups (each may carry its own lr)."""
    groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        # fused kernels: one pass per parameter instead of ~10 elementwise ops, on CUDA and CPU (torch >= 2.4); on
        # one CPU thread an AdamW step of the 5.6M-weight word LSTM takes 6 ms instead of 33 (BENCHMARKS.md)
        return cls(groups, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu"), **common)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **common)
    return torch.optim.RMSprop(groups, momentum=cfg.momentum, **common)


def warmup_steps(cfg: OptimParams, total: int) -> int:
    """Optimizer steps of linear warm-up: warmup_fraction of the run's `total` steps, rounded."""
    return round(cfg.warmup_fraction * total)


def lr_factor(cfg: OptimParams, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step`: linear warm-up, then the schedule.

    A captioner's self-critical epochs (scst_epochs, after max_epochs) run at the constant scst_lr: every group's
    lr scaled by scst_lr / lr, so an encoder group keeps its ratio to the decoder's.
    """
    total = max(1, cfg.max_epochs * steps_per_epoch)
    warmup = warmup_steps(cfg, total)
    scst = isinstance(cfg, CaptionerTrainParams) and cfg.scst_epochs > 0

    def factor(step: int) -> float:
        if scst and step >= total:
            return cfg.scst_lr / cfg.lr
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        epoch = step / max(1, steps_per_epoch)  # fractional: the decay is smooth within an epoch
        if cfg.schedule == "inverse_time":
            decay = 1.0 / (1.0 + cfg.decay_rate * epoch)
        elif cfg.schedule == "exponential":
            decay = cfg.gamma ** epoch
        elif cfg.schedule == "cosine":
            progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = 1.0
        return warm * decay

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimParams, steps_per_epoch: int) -> dict:
    """A per-step LambdaLR in Lightning's scheduler-config form."""
    return {"scheduler": LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch)), "interval": "step"}
