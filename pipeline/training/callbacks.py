"""Lightning callbacks: stop on a non-finite loss, and RNG state saved in checkpoints for exact resume."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(pl.Callback):
    """Stop training with a clear message as soon as the loss is NaN or inf."""

    def __init__(self, hint: str = "lower the learning rate or enable gradient clipping"):
        self.hint = hint

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss)}) at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}: {self.hint}")


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain ints and lists so the checkpoint loads with torch.load(weights_only=True)
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


class RNGStateCallback(pl.Callback):
    """Save torch/CUDA/NumPy/Python RNG states with each checkpoint; restore them on resume.

    States are restored just before the first training batch after a resume, not at load time,
    because Lightning draws from the global RNG in between (e.g. creating the data iterator) in a
    way the uninterrupted run did not at that point.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                 "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))
        random.setstate((state["python_version"], tuple(state["python"]), None))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class EpochHistory(pl.Callback):
    """Per-epoch learning curve (mean train loss, validation metrics), kept in every checkpoint."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.history: list[dict[str, float]] = []
        self._losses: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self_critical = getattr(pl_module, "self_critical", None)
        if loss is not None and not (self_critical and self_critical()):  # a REINFORCE loss is no cross-entropy
            self._losses.append(float(loss))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning validates before this hook, so the epoch's validation metrics are in callback_metrics
        row = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        if self._losses:  # none in self-critical epochs
            row["train_loss"] = sum(self._losses) / len(self._losses)
        for key in ("val/loss", self.monitor):
            if key in trainer.callback_metrics:
                row[key.replace("/", "_")] = float(trainer.callback_metrics[key])
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


class EpochLine(pl.Callback):
    """One plain line per epoch (the learning curve's row and the epoch's wall time), flushed at once.

    For logs and `dvc repro`, where stdout is not a terminal: no progress bar, and a piped stdout is
    block-buffered, so without the flush nothing would show until the process ends.
    """

    def __init__(self, label: str, history: EpochHistory, write: Any = print) -> None:
        self.label = label
        self.history = history
        self.write = write
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history.history or trainer.sanity_checking:
            return
        row = self.history.history[-1]  # EpochHistory runs first: its row is this epoch's
        values = "  ".join(f"{key.replace('_', '/', 1)} {value:.4f}" for key, value in row.items()
                           if key not in ("epoch", "step"))
        self.write(f"{self.label}: epoch {int(row['epoch']) + 1}/{trainer.max_epochs}  step {int(row['step'])}  "
                   f"{values}  {time.monotonic() - self._start:.1f} s", flush=True)
