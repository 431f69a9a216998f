"""Lightning DataModules over the prepared COCO split and the encoded text streams, resumable mid-epoch.

Exact resume (pipeline/training/resumable.py): every training order is a pure function of (seed, epoch) and
the training loader's place in the epoch is saved in the checkpoint. Under DDP, Lightning's
DistributedSampler is not used (`use_distributed_sampler=False`): `shard(rank, world)` gives each rank every
world-th training batch (the same number of steps on every rank), an equal block of rows of a batchified
stream, and every world-th evaluation item.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import DataLoader, Dataset

from pipeline.data import SPLITS
from pipeline.data.coco import read_captions
from pipeline.data.vocab import Vocabulary
from pipeline.training.datasets import (
    CaptionPairs,
    EpochBatchSampler,
    EpochOrder,
    LazyArray,
    SplitImages,
    StreamBatches,
    TokenWindows,
    collate_captions,
    collate_images,
    collate_single,
    collate_windows,
)
from pipeline.training.resumable import ResumableDataModule, ResumableLoader, eval_generator, resolve_pin_memory

log = logging.getLogger(__name__)

__all__ = ["CaptionDataModule", "LanguageModelDataModule", "ResumableLoader"]



class CaptionDataModule(ResumableDataModule):
    """Prepared COCO: (image, caption) pairs for training, one item per image for val/test.

    With `features_dir` (stage `features`: <split>.npy of a frozen encoder), training pairs carry "features"
    (C, h, w) instead of "images", and val/test items carry both: validation runs on the features, evaluation
    and the report still caption the raw images.
    """

    def __init__(self, coco_dir: str | Path, vocab: Vocabulary, batch_size: int, max_len: int,
                 num_workers: int, seed: int, pin_memory: bool | None = None, bucket: bool = False,
                 features_dir: str | Path | None = None, group_by_image: bool = False):
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (tokens including <end>), got {max_len}")
        self.coco_dir, self.vocab, self.batch_size, self.max_len = Path(coco_dir), vocab, batch_size, max_len
        if bucket and group_by_image:
            raise ValueError("bucket (train.bucket_by_length) and group_by_image (train.group_by_image) "
                             "exclude each other: a batch is either similar lengths or whole images")
        self.num_workers, self.seed, self.bucket, self.group_by_image = num_workers, seed, bucket, group_by_image
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.features_dir = None if features_dir is None else Path(features_dir)
        self._images: dict[str, LazyArray] = {}
        self._features: dict[str, LazyArray] = {}
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._refs: dict[str, dict[int, list[str]]] = {}
        self._pairs: CaptionPairs | None = None

    def _split(self, split: str) -> tuple[LazyArray, list[dict[str, Any]]]:
        """The split's lazily mapped images and its checked caption records (read once)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._images:
            images = LazyArray(self.coco_dir / split / "images.npy")
            shape = images.shape
            if images.dtype != np.uint8 or len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
                raise ValueError(f"{images.path}: expected uint8 (N, 3, S, S), got {images.dtype} {shape}")
            self._records[split] = read_captions(self.coco_dir / split / "captions.jsonl", shape[0])
            self._images[split] = images
        return self._images[split], self._records[split]

    def features(self, split: str) -> LazyArray | None:
        """The split's feature rows (N, C, h, w), one per image row; None without features_dir."""
        if self.features_dir is None:
            return None
        if split not in self._features:
            rows = len(self._split(split)[0])
            feats = LazyArray(self.features_dir / f"{split}.npy")
            if len(feats.shape) != 4 or feats.shape[0] != rows or feats.dtype.kind != "f":
                raise ValueError(f"{feats.path}: expected float features ({rows}, C, h, w) for the {rows} images "
                                 f"of {self.coco_dir / split}, got {feats.dtype} {feats.shape}")
            self._features[split] = feats
        return self._features[split]

    def encode(self, tokens: list[str]) -> list[int]:
        """[<start>, w..., <end>], words cut so that the whole is at most max_len + 1 ids."""
        return self.vocab.encode(tokens[: self.max_len - 1], add_start=True, add_end=True)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self._split(split)
        if self._pairs is None:
            images, records = self._split("train")
            encoded = [self.encode(c) for rec in records for c in rec["captions"]]
            offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
            ids = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(offsets[-1]))
            image_of = np.repeat(np.arange(len(records)), [len(r["captions"]) for r in records])
            feats = self.features("train")  # rows of the images: CaptionPairs indexes either the same way
            self._pairs = CaptionPairs(images if feats is None else feats, ids, offsets, image_of)
            log.info("captions: %d training pairs over %d images", len(image_of), len(records))
            cut = sum(len(c) >= self.max_len for rec in records for c in rec["captions"])  # + <end> > max_len
            if cut:
                log.warning("%d of %d training captions are longer than max_len %d tokens (incl. <end>) and are "
                            "cut: raise models.captioner.max_len to keep them whole", cut, len(image_of),
                            self.max_len)

    @property
    def image_size(self) -> int:
        return self._split("train")[0].shape[-1]

    def train_dataset(self) -> CaptionPairs:
        self.setup()
        assert self._pairs is not None
        return self._pairs

    def train_dataloader(self) -> ResumableLoader:
        pairs = self.train_dataset()
        # pairs are image-major (image_of ascending), so each image's captions are one consecutive group
        captions_per_image = np.unique(pairs.image_of, return_counts=True)[1] if self.group_by_image else None
        order = EpochOrder(len(pairs), self.seed, shuffle=True, group_sizes=captions_per_image)
        batches = EpochBatchSampler(order, self.batch_size, pairs.lengths() if self.bucket else None, self.part)
        collate = collate_captions if self.features_dir is None else functools.partial(collate_captions,
                                                                                        field="features")
        return self._track(ResumableLoader(pairs, batches, collate, self.num_workers, self.pin_memory, self.seed))

    def images_dataloader(self, split: str) -> DataLoader:
        """One item per image of `split` in row order (validation, evaluation, the nearest-neighbour baseline)."""
        images = self._eval_share(SplitImages(self._split(split)[0], self.features(split)))
        return DataLoader(images, batch_size=self.batch_size, shuffle=False,
                          collate_fn=collate_images, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, generator=eval_generator())

    def val_dataloader(self) -> DataLoader:
        return self.images_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.images_dataloader("test")

    def references(self, split: str) -> dict[int, list[str]]:
        """image_index -> every reference caption as space-joined lower-case tokens (cached: read only)."""
        if split not in self._refs:  # validation steps ask for it every batch
            records = self._split(split)[1]
            self._refs[split] = {i: [" ".join(c) for c in rec["captions"]] for i, rec in enumerate(records)}
        return self._refs[split]

    def image_ids(self, split: str) -> list[int]:
        """COCO image id of every row (position = image_index)."""
        return [rec["image_id"] for rec in self._split(split)[1]]


class LanguageModelDataModule(ResumableDataModule):
    """Encoded text streams: contiguous rows for truncated BPTT ("stream") or shuffled windows ("windows")."""

    def __init__(self, encoded_dir: str | Path, level: Literal["char", "word"], batch_size: int, seq_len: int,
                 mode: Literal["stream", "windows"], seed: int, num_workers: int,
                 pin_memory: bool | None = None):
        super().__init__()
        if level not in ("char", "word") or mode not in ("stream", "windows"):
            raise ValueError(f"level must be char|word and mode stream|windows, got {level!r}, {mode!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.encoded_dir, self.level, self.mode = Path(encoded_dir), level, mode
        self.batch_size, self.seq_len, self.seed, self.num_workers = batch_size, seq_len, seed, num_workers
        self.pin_memory = resolve_pin_memory(pin_memory)
        self._streams: dict[str, LazyArray] = {}

    def stream(self, split: str) -> LazyArray:
        """The split's id stream, memory-mapped lazily."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._streams:
            arr = LazyArray(self.encoded_dir / f"text_{split}_{self.level}.npy")
            if len(arr.shape) != 1 or arr.dtype.kind not in "iu":
                raise ValueError(f"{arr.path}: expected a 1-d integer id stream, got {arr.dtype} {arr.shape}")
            self._streams[split] = arr
        return self._streams[split]

    def num_tokens(self, split: str) -> int:
        """Tokens in the split's stream file."""
        return len(self.stream(split))

    def dataset(self, split: str) -> Dataset:
        """StreamBatches (items are whole (B, T) batches) or TokenWindows (items are T+1 windows).

        Under DDP a training stream has batch_size rows per rank (world * batch_size in all), an evaluation
        stream its usual rows rounded down to a multiple of world; each rank reads its own block of rows.
        """
        stream = self.stream(split)
        if self.mode == "windows":
            return TokenWindows(stream, self.seq_len)
        world = self.part[1]
        rows = self.batch_size * (world if split == "train" else 1)
        if split != "train" and len(stream) < 2 * rows:
            rows = max(1, len(stream) // 2)  # a short held-out stream is evaluated with fewer rows
            log.warning("%s: only %d tokens; evaluating with %d rows instead of %d",
                        stream.path, len(stream), rows, self.batch_size)
        if rows % world:
            rows = max(world, rows // world * world)
        return StreamBatches(stream, rows, self.seq_len, self.part)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self.stream(split)

    def train_dataloader(self) -> ResumableLoader:
        data = self.dataset("train")
        if self.mode == "stream":  # in order: row b of batch k+1 continues row b of batch k
            batches = EpochBatchSampler(EpochOrder(len(data), self.seed, shuffle=False), 1)
            collate = collate_single
        else:
            batches = EpochBatchSampler(EpochOrder(len(data), self.seed, shuffle=True), self.batch_size,
                                        part=self.part)
            collate = collate_windows
        loader = ResumableLoader(data, batches, collate, self.num_workers, self.pin_memory, self.seed)
        return self._track(loader)

    def _eval_loader(self, split: str) -> DataLoader:
        data = self.dataset(split)
        if self.mode == "windows":
            data = self._eval_share(data)  # a stream is already this rank's rows
        common = {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                  "persistent_workers": self.num_workers > 0, "shuffle": False, "generator": eval_generator()}
        if self.mode == "stream":
            return DataLoader(data, batch_size=1, collate_fn=collate_single, **common)
        return DataLoader(data, batch_size=self.batch_size, collate_fn=collate_windows, **common)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
