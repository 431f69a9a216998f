"""Exact mid-epoch resume of a training DataLoader, and the data-module base that checkpoints its place.

Every training order is a pure function of (seed, epoch) (EpochOrder), and the training DataLoader
(ResumableLoader) counts the batches it has handed to the training loop. Lightning 2.6 saves that count in
two places: the fit loop stores `state_dict()` of every `_Stateful` train loader under
`loops.fit_loop.state_dict.combined_loader`, and the data module's own `state_dict()` stores it again. The
second copy is what makes resume work when `trainer.estimated_stepping_batches` is read in
`configure_optimizers` (Lightning then builds the train loader before restoring the loops and never hands it
the loop's copy; Lightning issue #20550): the data module is restored before `configure_optimizers`, so it
passes the position to the loader it builds. The loader fixes its epoch and offset at the first batch, not at
`iter()`, so whichever path arrives first, the next pass starts exactly at the saved batch; the offset is
dropped when Lightning's `set_epoch` has meanwhile moved to a later epoch (`limit_train_batches` < 1).
Batches are counted as handed to the loop, which is exact because Lightning does not prefetch from sized
loaders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.training.datasets import EpochBatchSampler

log = logging.getLogger(__name__)


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochBatchSampler whose place in the epoch is saved and restored."""

    def __init__(self, dataset: Dataset, batch_sampler: EpochBatchSampler, collate_fn: Any,
                 num_workers: int, pin_memory: bool, seed: int):
        # own generator: creating an iterator must not draw from the global torch RNG (model randomness)
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=num_workers > 0,
                         generator=torch.Generator().manual_seed(seed))
        self._epoch, self._position = 0, 0  # epoch of the current pass, batches handed out in it
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        # a generator: the epoch and offset are fixed at the first next(), after Lightning's set_epoch
        # and after any load_state_dict, whatever order Lightning calls them in
        sampler = self.batch_sampler
        assert isinstance(sampler, EpochBatchSampler)
        epoch, start = sampler.sampler.epoch, 0
        if self._resume is not None:
            # the saved offset holds only if Lightning did not move on to a later epoch after the load (an
            # epoch cut short by limit_train_batches ends before the loader does)
            start = self._resume[1] if self._resume[0] == epoch else 0
            self._resume = None
        sampler.start = start
        self._epoch, self._position = epoch, start
        for batch in super().__iter__():
            self._position += 1  # counted in this process as handed out: workers' prefetching is not
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the training pass stands (a pending resume counts as the position)."""
        epoch, position = self._resume or (self._epoch, self._position)
        return {"epoch": epoch, "position": position, "batches": len(self),
                "seed": self.batch_sampler.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next pass at the saved batch (a finished epoch resumes at the next one)."""
        if state.get("batches") != len(self) or state.get("seed") != self.batch_sampler.sampler.seed:
            raise ValueError(
                f"cannot resume the training data exactly: the checkpoint has {state.get('batches')} batches "
                f"per epoch with seed {state.get('seed')}, this loader {len(self)} with seed "
                f"{self.batch_sampler.sampler.seed} (batch size, data or seed changed)")
        epoch, position = int(state["epoch"]), int(state["position"])
        self._resume = (epoch + 1, 0) if position >= len(self) else (epoch, position)
        self.batch_sampler.sampler.set_epoch(self._resume[0])  # Lightning's set_epoch, if it comes, wins
        log.info("training data resumes at epoch %d, batch %d of %d", *self._resume, len(self))


class ResumableDataModule(pl.LightningDataModule):
    """Saves the train loader's position in the checkpoint and hands it to the loader built on resume."""

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: ResumableLoader | None = None
        self._pending: dict[str, int] | None = None
        self.part = (0, 1)  # (rank, world): this process's share of the data under DDP

    def shard(self, rank: int, world: int) -> None:
        """Read only this DDP rank's share of every split (call before fit, on every rank)."""
        if not 0 <= rank < world:
            raise ValueError(f"shard: need 0 <= rank < world, got rank {rank}, world {world}")
        self.part = (rank, world)

    def _eval_share(self, data: Dataset) -> Dataset:
        """Every world-th item from the rank-th (all items on a single process)."""
        rank, world = self.part
        return data if world == 1 else Subset(data, range(rank, len(data), world))

    def _track(self, loader: ResumableLoader) -> ResumableLoader:
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        return {"train_loader": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state := state_dict.get("train_loader")) is None:
            return
        # also pending: a loader built before fit (e.g. to check epoch_fraction) is not the one Lightning
        # builds and iterates after restoring the checkpoint; that next one must start at the saved batch too
        self._pending = dict(state)
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)


def eval_generator() -> torch.Generator:
    """Evaluation loaders draw their worker seed from this, not the global RNG, so validating mid-run
    does not shift the model's random stream (exact resume depends on it)."""
    return torch.Generator().manual_seed(0)


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """None: pin host memory exactly when a CUDA device will receive the batches."""
    return torch.cuda.is_available() if pin_memory is None else pin_memory
