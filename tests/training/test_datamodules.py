"""Data modules: caption and LM batches, references, lazy maps, epoch orders and exact mid-epoch resume."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from pipeline.data.vocab import Vocabulary
from pipeline.tokens import END_ID, PAD_ID, START_ID
from pipeline.training.datamodules import CaptionDataModule, LanguageModelDataModule, ResumableLoader


@pytest.fixture(scope="module")
def prepared(prepared_params) -> dict[str, Path]:
    """The session's prepared data: COCO arrays and the word vocabulary."""
    p = prepared_params
    return {"coco": Path(p.paths.coco), "vocab": Path(p.paths.vocab) / "words.json",
            "size": p.prepare_coco.image_size}


@pytest.fixture(scope="module")
def words(prepared: dict[str, Path]) -> Vocabulary:
    return Vocabulary.load(prepared["vocab"])


def jsonl(coco: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (coco / split / "captions.jsonl").read_text("utf-8").splitlines()]


def captions_dm(prepared, words, batch_size=16, max_len=20, num_workers=0, seed=7, bucket=False,
                coco=None, group=False) -> CaptionDataModule:
    dm = CaptionDataModule(coco or prepared["coco"], words, batch_size, max_len, num_workers, seed,
                           pin_memory=False, bucket=bucket, group_by_image=group)
    dm.setup("fit")
    return dm


def epoch_batches(loader: ResumableLoader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.batch_sampler.sampler.set_epoch(epoch)
    return list(loader)


def fingerprint(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(batch.items()) if k != "images")


# ---- captions -------------------------------------------------------------------------------------------

def test_train_batches_are_padded_start_end_sequences(prepared, words):
    dm = captions_dm(prepared, words, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    s = prepared["size"]
    unique = len(set(batch["image_index"].tolist()))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (unique, 3, s, s)
    assert len(batch["captions"]) == len(batch["image_slot"]) == 8
    assert batch["captions"].dtype == torch.long and batch["image_index"].dtype == torch.long
    caps = batch["captions"]
    assert (caps[:, 0] == START_ID).all()
    lengths = [row.index(END_ID) + 1 for row in caps.tolist()]
    assert caps.shape[1] == max(lengths)  # padded to the batch's longest, no further
    for row, n in zip(caps.tolist(), lengths, strict=True):
        assert END_ID not in row[1: n - 1] and START_ID not in row[1:]
        assert row[n:] == [PAD_ID] * (caps.shape[1] - n)
    assert len(set(lengths)) > 1  # the sample's captions vary in length, so padding was exercised
    images = np.load(prepared["coco"] / "train" / "images.npy")
    # each image once, in order of first use; image_slot maps every caption to its image's row
    unique = list(dict.fromkeys(batch["image_index"].tolist()))
    assert torch.equal(batch["images"], torch.from_numpy(images[unique]))
    assert torch.equal(batch["images"][batch["image_slot"]], torch.from_numpy(images[batch["image_index"].numpy()]))


@pytest.mark.parametrize("max_len", [4, 64])
def test_pairs_follow_captions_jsonl_and_truncate(prepared, words, max_len):
    dm = captions_dm(prepared, words, max_len=max_len)
    pairs = dm.train_dataset()
    expected = [(i, c) for i, rec in enumerate(jsonl(prepared["coco"], "train")) for c in rec["captions"]]
    assert len(pairs) == len(expected)
    truncated = 0
    for k, (image_index, tokens) in enumerate(expected):
        _, ids, row = pairs[k]
        words_kept = tokens[: max_len - 1]
        truncated += len(words_kept) < len(tokens)
        assert row == image_index
        assert ids.tolist() == [START_ID, *words.encode(words_kept), END_ID]
        assert len(ids) <= max_len + 1 and (len(words_kept) == len(tokens) or len(ids) == max_len + 1)
    assert (truncated > 0) == (max_len == 4)  # sample captions: more than 3 words, at most 50 (prepare_coco)


def test_an_epoch_uses_every_pair_once_in_a_seeded_order(prepared, words):
    dm = captions_dm(prepared, words, batch_size=16, seed=3)
    pairs = dm.train_dataset()
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(len(pairs) / 16)
    seen = Counter()
    for batch in epoch_batches(loader, 0):
        for i, row in zip(batch["image_index"].tolist(), batch["captions"].tolist(), strict=True):
            seen[(i, tuple(t for t in row if t != PAD_ID))] += 1
    assert seen == Counter((pairs[k][2], tuple(pairs[k][1].tolist())) for k in range(len(pairs)))

    def order(seed: int, epoch: int) -> list[tuple]:
        fresh = captions_dm(prepared, words, 16, seed=seed).train_dataloader()  # as a new process would
        return [fingerprint(b) for b in epoch_batches(fresh, epoch)]

    first = [fingerprint(b) for b in epoch_batches(loader, 0)]
    second = [fingerprint(b) for b in epoch_batches(loader, 1)]
    again, other = order(3, 0), order(4, 0)
    assert first != second and first == again and first != other


def test_bucketing_cuts_padding_and_keeps_every_pair(prepared, words):
    def padding_and_pairs(bucket: bool, epoch: int) -> tuple[int, Counter]:
        loader = captions_dm(prepared, words, batch_size=8, bucket=bucket).train_dataloader()
        pads, pairs = 0, Counter()
        for batch in epoch_batches(loader, epoch):
            pads += int((batch["captions"] == PAD_ID).sum())
            rows = map(tuple, batch["captions"].tolist())
            pairs.update(zip(batch["image_index"].tolist(), rows, strict=True))
        return pads, Counter({(i, tuple(t for t in c if t)): n for (i, c), n in pairs.items()})

    plain_pads, plain_pairs = padding_and_pairs(False, 0)
    bucket_pads, bucket_pairs = padding_and_pairs(True, 0)
    assert bucket_pads < plain_pads / 2
    assert bucket_pairs == plain_pairs
    dm = captions_dm(prepared, words, batch_size=8, bucket=True)
    assert [fingerprint(b) for b in epoch_batches(dm.train_dataloader(), 0)] != \
        [fingerprint(b) for b in epoch_batches(dm.train_dataloader(), 1)]


def test_grouping_by_image_keeps_every_pair_and_encodes_each_image_once(prepared, words):
    def epoch(group: bool, e: int) -> tuple[Counter, int, list[tuple]]:
        loader = captions_dm(prepared, words, batch_size=10, group=group).train_dataloader()
        pairs, images, prints = Counter(), 0, []
        for batch in epoch_batches(loader, e):
            rows = [tuple(t for t in c if t != PAD_ID) for c in batch["captions"].tolist()]
            pairs.update(zip(batch["image_index"].tolist(), rows, strict=True))
            images += len(batch["images"])
            prints.append(fingerprint(batch))
        return pairs, images, prints

    plain_pairs, plain_images, _ = epoch(False, 0)
    grouped_pairs, grouped_images, first = epoch(True, 0)
    assert grouped_pairs == plain_pairs
    per_image = sum(plain_pairs.values()) / len({i for i, _ in plain_pairs})  # ~5 captions each
    assert grouped_images < plain_images / (per_image / 2)  # images encoded per epoch: about 1/5
    assert first != epoch(True, 1)[2] and first == epoch(True, 0)[2]  # a seeded order that changes per epoch


def test_group_order_keeps_groups_together_and_shuffles_within():
    from pipeline.training.datasets import EpochOrder

    sizes = np.array([3, 1, 5, 2, 4])
    order = EpochOrder(int(sizes.sum()), seed=1, shuffle=True, group_sizes=sizes)
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    runs = []
    for epoch in range(6):
        order.set_epoch(epoch)
        idx = order.indices()
        assert sorted(idx.tolist()) == list(range(sizes.sum()))
        groups = group_of[idx]
        assert (np.diff(groups) != 0).sum() == len(sizes) - 1  # each group one contiguous run
        runs.append(idx.tolist())
    assert len({tuple(r) for r in runs}) == 6
    third = [[i for i in r if group_of[i] == 2] for r in runs]  # the 5 items of group 2, as visited
    assert any(t != sorted(t) for t in third)  # items move within their group too
    with pytest.raises(ValueError, match="sum to the 14 items"):
        EpochOrder(14, seed=1, shuffle=True, group_sizes=sizes)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_batches_references_and_ids(prepared, words, split):
    dm = captions_dm(prepared, words, batch_size=3)
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    batches = list(loader)
    images = np.load(prepared["coco"] / split / "images.npy")
    assert set(batches[0]) == {"images", "image_index"}
    assert torch.cat([b["image_index"] for b in batches]).tolist() == list(range(len(images)))
    assert torch.equal(torch.cat([b["images"] for b in batches]), torch.from_numpy(images))
    records = jsonl(prepared["coco"], split)
    assert dm.references(split) == {i: [" ".join(c) for c in r["captions"]] for i, r in enumerate(records)}
    assert dm.image_ids(split) == [r["image_id"] for r in records]


def test_datasets_pickle_without_their_arrays(prepared, words):
    dm = captions_dm(prepared, words)
    pairs = dm.train_dataset()
    item = pairs[5]  # maps images.npy in this process
    assert pairs.images._array is not None
    blob = pickle.dumps(pairs)
    assert b"\x93NUMPY" not in blob and len(blob) < pairs.images.array.nbytes
    clone = pickle.loads(blob)
    assert clone.images._array is None  # re-opened lazily by whoever unpickles it (a spawned worker)
    again = clone[5]
    assert torch.equal(again[0], item[0]) and torch.equal(again[1], item[1])


def test_bad_prepared_files_name_the_file(prepared, words, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(prepared["coco"], coco)
    lines = (coco / "val" / "captions.jsonl").read_text("utf-8").splitlines()
    (coco / "val" / "captions.jsonl").write_text("\n".join(lines[:-1]) + "\n", "utf-8")
    with pytest.raises(ValueError, match=r"val/captions.jsonl: 3 records but images.npy has 4 rows"):
        captions_dm(prepared, words, coco=coco)
    np.save(coco / "val" / "images.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"val/images.npy: expected uint8 \(N, 3, S, S\)"):
        captions_dm(prepared, words, coco=coco)


# ---- language model streams ------------------------------------------------------------------------------

def write_streams(root: Path, n: dict[str, int], level: str = "char") -> Path:
    """Streams of distinct ids (4, 5, 6, ...): a token's value tells its position in the stream."""
    root.mkdir(parents=True, exist_ok=True)
    for split, size in n.items():
        np.save(root / f"text_{split}_{level}.npy", np.arange(4, 4 + size, dtype=np.int32))
    return root


def lm_dm(root: Path, mode: str, batch_size=3, seq_len=5, seed=11, num_workers=0) -> LanguageModelDataModule:
    return LanguageModelDataModule(root, "char", batch_size, seq_len, mode, seed, num_workers,
                                   pin_memory=False)


def test_stream_batches_continue_row_by_row(tmp_path):
    root = write_streams(tmp_path, {"train": 68, "val": 20, "test": 20})
    dm = lm_dm(root, "stream", batch_size=3, seq_len=5)
    batches = list(dm.train_dataloader())
    row_len = 68 // 3  # 22 tokens per row, 2 dropped; 21 targets per row -> windows of 5, 5, 5, 5, 1
    assert [b["inputs"].shape for b in batches] == [(3, 5)] * 4 + [(3, 1)]
    for b in batches:
        assert b["inputs"].dtype == torch.long and torch.equal(b["targets"], b["inputs"] + 1)
    for prev, nxt in zip(batches, batches[1:], strict=False):
        assert torch.equal(prev["inputs"][:, -1] + 1, nxt["inputs"][:, 0])  # row b continues row b
        assert torch.equal(prev["targets"][:, -1], nxt["inputs"][:, 0])
    rows = torch.cat([b["inputs"] for b in batches], dim=1)  # (3, 21)
    assert torch.equal(rows, torch.arange(4, 4 + 3 * row_len).reshape(3, row_len)[:, :-1])
    assert dm.num_tokens("train") == 68 and dm.num_tokens("val") == 20


def test_short_eval_stream_uses_fewer_rows_and_train_refuses(tmp_path):
    root = write_streams(tmp_path, {"train": 5, "val": 5, "test": 9})
    dm = lm_dm(root, "stream", batch_size=3)
    assert next(iter(dm.val_dataloader()))["inputs"].shape[0] == 2
    with pytest.raises(ValueError, match=r"text_train_char.npy: 5 tokens cannot fill 3 rows"):
        dm.train_dataloader()


def test_windows_tile_the_stream_and_shuffle_per_epoch(tmp_path):
    root = write_streams(tmp_path, {"train": 43, "val": 43, "test": 12})
    dm = lm_dm(root, "windows", batch_size=3, seq_len=4)
    val = list(dm.val_dataloader())
    inputs = torch.cat([b["inputs"] for b in val]).flatten()
    targets = torch.cat([b["targets"] for b in val]).flatten()
    scored = targets != PAD_ID  # every transition (t -> t+1) of the stream is scored once, in order
    assert inputs[scored].tolist() == list(range(4, 4 + 42))
    assert targets[scored].tolist() == list(range(5, 5 + 42))
    assert val[-1]["targets"][-1].tolist() == [45, 46, PAD_ID, PAD_ID]  # 42 transitions = 10 * 4 + 2

    loader = dm.train_dataloader()
    epochs = [[tuple(r) for b in epoch_batches(loader, e) for r in b["inputs"].tolist()] for e in (0, 1)]
    assert epochs[0] != epochs[1]
    in_order = sorted(tuple(r) for b in val for r in b["inputs"].tolist())
    assert sorted(epochs[0]) == sorted(epochs[1]) == in_order  # the same windows, reordered


def test_stream_file_must_be_a_1d_integer_array(tmp_path):
    write_streams(tmp_path, {"train": 40, "val": 10, "test": 10})
    np.save(tmp_path / "text_val_char.npy", np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match=r"text_val_char.npy: expected a 1-d integer id stream"):
        lm_dm(tmp_path, "stream").setup("fit")
    (tmp_path / "text_val_char.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_val_char.npy: not found"):
        lm_dm(tmp_path, "stream").num_tokens("val")


# ---- resumable position ------------------------------------------------------------------------------------

def test_loader_state_resumes_at_the_saved_batch(tmp_path):
    root = write_streams(tmp_path, {"train": 43, "val": 10, "test": 10})
    loader = lm_dm(root, "windows", seq_len=4).train_dataloader()
    full = [fingerprint(b) for b in epoch_batches(loader, 2)]
    it = iter(loader)
    head = [fingerprint(next(it)) for _ in range(2)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["position"] == 2

    fresh = lm_dm(root, "windows", seq_len=4).train_dataloader()
    fresh.load_state_dict(state)
    assert fresh.state_dict()["position"] == 2  # a pending resume is what a checkpoint would save
    assert head + [fingerprint(b) for b in fresh] == full

    ended = lm_dm(root, "windows", seq_len=4).train_dataloader()
    ended.load_state_dict({**state, "position": len(ended)})  # a finished epoch resumes at the next one
    assert [fingerprint(b) for b in ended] == [fingerprint(b) for b in epoch_batches(loader, 3)]
    with pytest.raises(ValueError, match="cannot resume the training data exactly"):
        lm_dm(root, "windows", seq_len=4, batch_size=2).train_dataloader().load_state_dict(state)


class Crash(RuntimeError):
    """Stands for the process dying during a training step."""


class Recorder(pl.LightningModule):
    """Records every training batch it sees; can die before a given step."""

    def __init__(self, crash_at: int | None, estimate_steps: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.crash_at, self.estimate_steps, self.seen, self.validated = crash_at, estimate_steps, [], 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.crash_at:
            raise Crash(f"died at step {self.global_step}")
        self.seen.append(fingerprint(batch))
        x = (batch["captions"] if "captions" in batch else batch["inputs"]).float().mean()
        return (self.w * x).sum() + self.w.pow(2).sum()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validated += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.estimate_steps:  # as the real modules do for their schedules (Lightning issue #20550)
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(make_dm, root: Path, every=None, crash_at=None, ckpt_path=None, estimate_steps=False,
        limit=1.0) -> list:
    """Train 2 epochs, recording the batches; checkpoint `every` that many steps, or "last" after validation."""
    model = Recorder(crash_at, estimate_steps)
    ckpt = [ModelCheckpoint(dirpath=root, save_last=True) if every == "last" else
            ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=every, save_top_k=-1)]
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                         limit_train_batches=limit,
                         callbacks=ckpt if every else [], enable_checkpointing=bool(every),
                         default_root_dir=root)
    if crash_at:
        with pytest.raises(Crash):
            trainer.fit(model, datamodule=make_dm())
    else:
        trainer.fit(model, datamodule=make_dm(), ckpt_path=ckpt_path, weights_only=True)  # as fit.py does
        assert model.validated > 0  # validation at epoch ends runs between the training batches
    return model.seen


RESUME_CASES = [  # data, num_workers, crash before step, estimated_stepping_batches read, limit_train_batches
    ("captions", 0, 2, False, 5), ("captions", 0, 5, True, 5), ("captions", 0, 7, True, 5),
    ("captions", 1, 7, True, 5), ("captions", 0, 4, True, 4), ("buckets", 0, 8, False, 5),
    ("stream", 0, 3, False, 5), ("stream", 0, 7, True, 5), ("stream", 1, 6, False, 5),
    ("windows", 0, 6, True, 5), ("captions", 0, "last", True, 5), ("windows", 0, "last", True, 4),
    ("groups", 0, 7, True, 5),
]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resuming in place
@pytest.mark.parametrize(("data", "workers", "crash_at", "estimate", "limit"), RESUME_CASES)
def test_resume_from_a_mid_epoch_checkpoint_sees_the_same_batches(prepared, words, tmp_path, data, workers,
                                                                   crash_at, estimate, limit):
    root = write_streams(tmp_path / "encoded", {"train": 41, "val": 10, "test": 10})

    def make_dm():
        if data in ("captions", "buckets", "groups"):
            return captions_dm(prepared, words, batch_size=16, num_workers=workers, bucket=data == "buckets",
                               group=data == "groups")
        return lm_dm(root, data, batch_size=2, seq_len=4, num_workers=workers)

    per_epoch = len(make_dm().train_dataloader())
    assert per_epoch == 5  # 80 pairs / 16; stream: 19 targets a row / 4; windows: 10 windows / 2
    uninterrupted = fit(make_dm, tmp_path / "a", estimate_steps=estimate, limit=limit)
    assert len(uninterrupted) == 2 * limit  # limit < per_epoch: epochs end before the loader does
    if data != "stream":
        assert uninterrupted[:limit] != uninterrupted[limit:]  # a new order each epoch
    every, name = crash_at, f"step={crash_at}.ckpt"
    if crash_at == "last":  # fit.py's last.ckpt, saved after validation: die right after epoch 0
        every, name, crash_at = "last", "last.ckpt", limit
    before = fit(make_dm, tmp_path / "b", every, crash_at=crash_at, estimate_steps=estimate, limit=limit)
    after = fit(make_dm, tmp_path / "b", every, ckpt_path=tmp_path / "b" / name, estimate_steps=estimate,
                limit=limit)
    assert len(before) == crash_at
    assert before + after == uninterrupted
