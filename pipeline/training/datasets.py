"""Map-style datasets over the prepared files, the resumable epoch samplers, and the collate functions.

Arrays are memory-mapped lazily: a dataset stores file paths, and each process opens its own mapping on
first access, so DataLoader workers (forked or spawned) never share a file handle and pickling a dataset
never copies an array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.tokens import PAD_ID

# Bucketed batching sorts pools of this many batches by caption length: large enough to cut most padding,
# small enough that a batch still mixes captions from across the (shuffled) epoch.
POOL_BATCHES = 50


class LazyArray:
    """A .npy file memory-mapped on first use in each process; pickles as its path only."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:  # read the header now (shape/dtype for validation and lengths), map the data later
            probe = np.load(self.path, mmap_mode="r")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: not found (run the data stages first)") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: not a readable .npy array ({err})") from None
        self.shape, self.dtype = tuple(probe.shape), probe.dtype
        del probe
        self._array: np.ndarray | None = None
        self._pid: int | None = None

    @property
    def array(self) -> np.ndarray:
        """The read-only memory map, opened once per process (a forked worker re-opens its own)."""
        if self._array is None or self._pid != os.getpid():
            self._array, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _array=None, _pid=None)


def _image(images: LazyArray, row: int) -> torch.Tensor:
    # copy out of the read-only map: torch must own writable memory
    return torch.from_numpy(np.array(images.array[row]))  # (3, S, S) uint8


class CaptionPairs(Dataset):
    """One item per (image, caption) pair: (image uint8 (3,S,S), ids long (L,), image_index).

    Given a feature array instead of the images, the first element is the image's features (C, h, w).
    """

    def __init__(self, images: LazyArray, ids: np.ndarray, offsets: np.ndarray, image_of: np.ndarray):
        self.images, self.ids, self.offsets, self.image_of = images, ids, offsets, image_of

    def __len__(self) -> int:
        return len(self.image_of)

    def lengths(self) -> np.ndarray:
        """Token count of every caption (for bucketing)."""
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.image_of[i])
        ids = torch.from_numpy(self.ids[self.offsets[i]: self.offsets[i + 1]].astype(np.int64))
        return _image(self.images, row), ids, row


class SplitImages(Dataset):
    """One item per image of a split: (image uint8 (3,S,S), image_index), plus its features (C,h,w) if given."""

    def __init__(self, images: LazyArray, features: LazyArray | None = None):
        self.images, self.features = images, features

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        if self.features is None:
            return _image(self.images, i), i
        return _image(self.images, i), i, _image(self.features, i)


def collate_captions(items: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                     field: str = "images") -> dict[str, torch.Tensor]:
    """Stack each image (or features: field="features") once, pad captions with <pad> to the longest.

    Captions of the same image share one row of `field` (U <= B rows, in order of first use), so the
    encoder runs once per image; "image_slot" (B,) maps each caption to its image's row.
    """
    images, captions, index = zip(*items, strict=True)
    padded = torch.full((len(items), max(len(c) for c in captions)), PAD_ID, dtype=torch.long)  # (B, T)
    for row, ids in enumerate(captions):
        padded[row, : len(ids)] = ids
    row_of: dict[int, int] = {}  # image index -> its row among the unique images
    unique = []
    for image, i in zip(images, index, strict=True):
        if i not in row_of:
            row_of[i] = len(unique)
            unique.append(image)
    slot = [row_of[i] for i in index]
    return {field: torch.stack(unique), "image_slot": torch.tensor(slot, dtype=torch.long), "captions": padded,
            "image_index": torch.tensor(index, dtype=torch.long)}


def collate_images(items: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Stack SplitImages items: images (B, 3, S, S), image_index (B,), and features (B, C, h, w) when present."""
    images, index, *features = zip(*items, strict=True)
    batch = {"images": torch.stack(images), "image_index": torch.tensor(index, dtype=torch.long)}
    if features:
        batch["features"] = torch.stack(features[0])
    return batch


class StreamBatches(Dataset):
    """Item k is batch k of a batchified stream: rows[:, kT : kT+T] -> rows[:, kT+1 : kT+T+1].

    The stream is cut into `rows` contiguous rows (the remainder dropped), so row b of batch k+1 continues
    row b of batch k. The last window is kept when it has at least one target (it is then shorter than T).
    `part=(rank, world)` keeps rows rank*rows/world .. (rank+1)*rows/world: a DDP rank's share of every batch
    (each row stays contiguous, so a carried hidden state still continues exactly).
    """

    def __init__(self, stream: LazyArray, rows: int, seq_len: int, part: tuple[int, int] = (0, 1)):
        self.stream, self.rows, self.seq_len = stream, rows, seq_len
        self.row_len = len(stream) // rows
        if self.row_len < 2:
            raise ValueError(f"{stream.path}: {len(stream)} tokens cannot fill {rows} rows of >= 2 tokens")
        rank, world = part
        if rows % world or not 0 <= rank < world:
            raise ValueError(f"{stream.path}: cannot give rank {rank} of {world} an equal share of {rows} rows")
        self.row_range = (rank * rows // world, (rank + 1) * rows // world)

    def __len__(self) -> int:
        return math.ceil((self.row_len - 1) / self.seq_len)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        grid = self.stream.array[: self.rows * self.row_len].reshape(self.rows, self.row_len)  # (B, L)
        grid = grid[self.row_range[0]: self.row_range[1]]  # (B/world, L): this rank's rows
        start, stop = k * self.seq_len, min((k + 1) * self.seq_len, self.row_len - 1)
        block = torch.from_numpy(grid[:, start: stop + 1].astype(np.int64))  # (B, T+1)
        return {"inputs": block[:, :-1], "targets": block[:, 1:]}


class TokenWindows(Dataset):
    """Item j is tokens[jT : jT+T+1]: inputs and targets of consecutive windows tile the stream.

    Consecutive windows share one boundary token so every transition is a target exactly once; the last
    window (>= 2 tokens) is padded with <pad>, which the loss ignores (ignore_index=PAD_ID).
    """

    def __init__(self, stream: LazyArray, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        if len(stream) < 2:
            raise ValueError(f"{stream.path}: {len(stream)} tokens, need at least 2")

    def __len__(self) -> int:
        return math.ceil((len(self.stream) - 1) / self.seq_len)

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < len(self):
            raise IndexError(j)
        chunk = self.stream.array[j * self.seq_len: (j + 1) * self.seq_len + 1]
        window = torch.full((self.seq_len + 1,), PAD_ID, dtype=torch.long)  # (T+1,)
        window[: len(chunk)] = torch.from_numpy(chunk.astype(np.int64))
        return window


def collate_windows(items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    block = torch.stack(list(items))  # (B, T+1)
    return {"inputs": block[:, :-1], "targets": block[:, 1:]}


def collate_single(items: Sequence[Any]) -> Any:
    """The batch sampler hands one pre-built batch at a time (StreamBatches)."""
    return items[0]


class EpochOrder(Sampler[int]):
    """The item order of one epoch: a permutation that is a pure function of (seed, epoch), or identity.

    With `group_sizes` (items come as consecutive groups, e.g. the captions of one image), the groups are
    permuted and each group's items stay adjacent, in a shuffled order: a batch then holds whole groups.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool, group_sizes: np.ndarray | None = None):
        if group_sizes is not None and (int(np.sum(group_sizes)) != num_items or np.any(group_sizes < 1)):
            raise ValueError(f"group_sizes must be positive and sum to the {num_items} items, "
                             f"got {len(group_sizes)} groups summing to {int(np.sum(group_sizes))}")
        self.num_items, self.seed, self.shuffle, self.epoch = num_items, seed, shuffle, 0
        self.group_sizes = group_sizes

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning (via batch_sampler.sampler) before every training epoch."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.group_sizes is None:
            return rng.permutation(self.num_items)
        place = np.empty(len(self.group_sizes), dtype=np.int64)
        place[rng.permutation(len(self.group_sizes))] = np.arange(len(self.group_sizes))  # group -> its slot
        slot_of_item = np.repeat(place, self.group_sizes)  # (num_items,)
        return np.lexsort((rng.random(self.num_items), slot_of_item))  # by slot, then randomly within a group

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_items


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch from `sampler`'s order, optionally length-bucketed; iteration begins at `start`.

    With `lengths`, the epoch's order is cut into pools of POOL_BATCHES batches, each pool is sorted by
    length and cut into batches, and the batch order is shuffled (also a pure function of seed and epoch).
    `part=(rank, world)` keeps every world-th batch from the rank-th, after dropping the last few so that
    every DDP rank runs the same number of steps (a rank with one step more would wait forever).
    """

    def __init__(self, sampler: EpochOrder, batch_size: int, lengths: np.ndarray | None = None,
                 part: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= part[0] < part[1]:
            raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {part}")
        self.sampler, self.batch_size, self.lengths, self.part = sampler, batch_size, lengths, part
        self.start = 0  # set by ResumableLoader before each iteration

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size) // self.part[1]

    def batches(self) -> list[list[int]]:
        """Every batch of the current epoch (this rank's share), in order."""
        rank, world = self.part
        every = self._all_batches()
        return every if world == 1 else every[: len(every) // world * world][rank::world]

    def _all_batches(self) -> list[list[int]]:
        order = self.sampler.indices()
        if self.lengths is None:
            return [order[i: i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        pool = self.batch_size * POOL_BATCHES
        out = []
        for p in range(0, len(order), pool):
            chunk = order[p: p + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            out += [chunk[i: i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        rng = np.random.default_rng((self.sampler.seed, self.sampler.epoch, 1))
        return [out[i] for i in rng.permutation(len(out))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.start:])
