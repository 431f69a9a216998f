"""Batched beam search (the whole batch x beam as one batch) against the same search one image at a time.

The captioner is the default one (params.yaml) trained for a couple of epochs on the workspace's sample, so
that hypotheses end at realistic lengths (an untrained model never says <end> and every search would run to
max_len, flattering neither side); with --quick it is untrained. Images are the workspace's test split,
encoded once outside the timing: both sides decode the same memory, and must return the same captions.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch

from bench.common import Context, Figure, case
from bench.workspace import prepared
from pipeline.decoding import beam_search
from pipeline.training.checkpoints import load_module
from pipeline.training.datamodules import CaptionDataModule
from pipeline.training.fit import build_datamodule, build_module, train, vocabulary
from pipeline.training.modules import CaptioningModule

BATCH, WIDTH = 64, 5
TRAIN_EPOCHS = 2


def captioner(ctx: Context) -> tuple[CaptioningModule, CaptionDataModule, str]:
    """A briefly trained default captioner (untrained with --quick), its data module, and which it is."""
    p = prepared(ctx)
    if ctx.quick:
        dm = build_datamodule(p, "captioner", vocabulary(p, "captioner"))
        return build_module(p, "captioner", vocabulary(p, "captioner"), dm).eval(), dm, "untrained (--quick)"
    p = p.overridden({"train.captioner.max_epochs": TRAIN_EPOCHS})
    quiet = logging.getLogger("pytorch_lightning")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = train(p, "captioner", logger=False, enable_progress_bar=False)
    finally:
        quiet.setLevel(level)
    dm = build_datamodule(p, "captioner", vocabulary(p, "captioner"))
    return load_module("captioner", result.best_checkpoint), dm, f"trained {TRAIN_EPOCHS} epochs on the sample"


@case("beam")
def beam_speedup(ctx: Context) -> list[Figure]:
    """Batched beam search (batch 64, width 5) against the same search run one image at a time."""
    module, dm, what = captioner(ctx)
    device = ctx.device
    model = module.model.to(device)
    images = torch.cat([b["images"] for b in dm.test_dataloader()])  # (N, 3, S, S) uint8
    images = images.repeat((BATCH + len(images) - 1) // len(images), 1, 1, 1)[:BATCH].to(device)  # (B, 3, S, S)
    max_len, alpha = module.model_cfg.max_len, 0.7
    with torch.no_grad():
        memory = model.encode(images)
    out: dict[str, list] = {}

    def batched() -> None:
        out["batched"] = beam_search(model, memory, BATCH, WIDTH, max_len, alpha).tokens

    def one_by_one() -> None:
        out["single"] = [beam_search(model, memory[i: i + 1], 1, WIDTH, max_len, alpha).tokens[0]
                         for i in range(BATCH)]

    fast, slow = ctx.timed(batched), ctx.timed(one_by_one)
    same = out["batched"] == out["single"]
    mean_len = sum(map(len, out["batched"])) / BATCH
    note = f"{what}; mean caption {mean_len:.1f} tokens of max {max_len}; same captions both ways: {same}"
    fast_rate, fast_spread = fast.rate(BATCH)
    slow_rate, slow_spread = slow.rate(BATCH)
    return [Figure("batched (64 x 5)", fast_rate, "images/s", spread=fast_spread, note=note),
            Figure("one image at a time (width 5)", slow_rate, "images/s", spread=slow_spread),
            Figure.check("speed-up of batching", slow.median / fast.median, "x", ">=", 10,
                         note="ratio of the two medians, same run")]
