"""Data loading against the model: batches/s of each family's training DataLoader (as `capline train` builds
it, batches moved to the device) and the model's training steps/s on those same batches. The model must never
wait for data: the loader should deliver at least 1.5x the step rate. Also: the same loader with one worker
process per core (pinned memory, persistent workers), and what length-bucketed or image-grouped caption batches save.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch

from bench.common import Context, Figure, Timing, case
from bench.training import Workload, captioner_workload, lm_workload, step_fn
from bench.workspace import prepared
from pipeline.families import FAMILIES
from pipeline.params import Params
from pipeline.training.datamodules import CaptionDataModule
from pipeline.training.fit import build_datamodule, caption_max_len, vocabulary

GPU_BATCH = {"captioner": 256, "lstm_lm": 256, "transformer_lm": 64}  # what a GPU run would use
LOADER_BATCHES = 40  # per timed pass (fewer if an epoch is shorter)
STEPS = 5  # timed training steps per pass on a CPU (20 on a GPU)


def family_params(ctx: Context) -> Params:
    """The workspace params, with GPU-sized batches when a GPU is present."""
    p = prepared(ctx)
    if ctx.device.type != "cuda":
        return p
    return p.overridden({f"train.{f}.batch_size": b for f, b in GPU_BATCH.items()})


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What Lightning does with a batch: tensors to the device (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def loader_timing(ctx: Context, loader: Any, device: torch.device) -> tuple[Timing, int]:
    """Timing of passes over the first n batches (a fresh iterator each pass, as every epoch starts one)."""
    n = min(LOADER_BATCHES, len(loader))

    def one_pass() -> None:
        for batch in itertools.islice(iter(loader), n):
            to_device(batch, device)

    return ctx.timed(one_pass), n


def workload(p: Params, family: str) -> Workload:
    """The family's model as params.yaml configures it, at the loader's batch size."""
    size = len(vocabulary(p, family))
    batch = getattr(p.train, family).batch_size
    if family == "captioner":
        return captioner_workload(p, p.models.captioner.arch, size, p.prepare_coco.image_size, batch)
    return lm_workload(p, family, size, batch)


def step_timing(ctx: Context, w: Workload, batches: list[dict], steps: int) -> Timing:
    """Timing of `steps` training steps cycling through real batches (already on the device)."""
    step = step_fn(w, batches[0], ctx.device, ctx.compile)

    def run() -> None:
        for i in range(steps):
            step(batches[i % len(batches)])

    return ctx.timed(run)


def _rates_for(ctx: Context, p: Params, family: str) -> list[Figure]:
    device, steps = ctx.device, (1 if ctx.quick else STEPS * (4 if ctx.device.type == "cuda" else 1))
    dm = build_datamodule(p, family, vocabulary(p, family))
    loader = dm.train_dataloader()
    timing, n = loader_timing(ctx, loader, device)
    load_rate, load_spread = timing.rate(n)
    batches = [to_device(b, device) for b in itertools.islice(iter(loader), min(steps, len(loader)))]
    w = workload(p, family)
    stimed = step_timing(ctx, w, batches, steps)
    step_rate, step_spread = stimed.rate(steps)
    w.net.cpu()
    figures = [
        Figure(f"{family}: loader (num_workers {p.train.num_workers})", load_rate, "batches/s", spread=load_spread,
               note=f"batch {getattr(p.train, family).batch_size}"),
        Figure(f"{family}: training steps", step_rate, "steps/s", spread=step_spread),
        Figure.check(f"{family}: loader / step rate", load_rate / step_rate, "x", ">=", 1.5,
                     note="the model never waits for data when >= 1.5"),
    ]
    workers = os.cpu_count() or 1
    if not ctx.quick and workers > 1 and p.train.num_workers != workers:
        pw = p.overridden({"train.num_workers": workers})
        many = build_datamodule(pw, family, vocabulary(pw, family)).train_dataloader()
        mtiming, mn = loader_timing(ctx, many, device)  # the warm-up pass starts the persistent workers
        rate, spread = mtiming.rate(mn)
        figures.append(Figure(f"{family}: loader (num_workers {workers}, persistent, pin_memory "
                              f"{many.pin_memory})", rate, "batches/s", spread=spread,
                              note=f"{rate / step_rate:.1f}x the step rate"))
        del many
    return figures


def padding(dm: CaptionDataModule) -> tuple[float, float]:
    """(share of <pad> among caption positions, mean padded width) over one training epoch."""
    pads = cells = widths = batches = 0
    for batch in dm.train_dataloader():
        caps = batch["captions"]  # (B, T)
        pads += int((caps == 0).sum())
        cells, widths, batches = cells + caps.numel(), widths + caps.shape[1], batches + 1
    return pads / max(1, cells), widths / max(1, batches)


BATCHINGS = {"plain": {}, "bucketed": {"bucket": True}, "grouped": {"group_by_image": True}}


def _batchings(ctx: Context, p: Params) -> list[Figure]:
    """Padding, images encoded and captioner step rate over the first batches of an epoch, per batching:
    random pairs (plain), similar lengths (train.bucket_by_length), whole images (train.group_by_image)."""
    vocab, c = vocabulary(p, "captioner"), p.train.captioner
    steps = 1 if ctx.quick else 10
    figures, rates = [], {}
    for label, how in BATCHINGS.items():
        dm = CaptionDataModule(p.paths.coco, vocab, c.batch_size, caption_max_len(p),
                               p.train.num_workers, p.seed, **how)
        pad, width = padding(dm)
        batches = [to_device(b, ctx.device) for b in itertools.islice(iter(dm.train_dataloader()), steps)]
        w = workload(p, "captioner")
        rates[label] = step_timing(ctx, w, batches, steps).rate(steps)[0]
        w.net.cpu()
        images = sum(len(b["images"]) for b in batches) / len(batches)
        figures.append(Figure(f"captions {label}: padding", pad, "fraction of positions",
                              note=f"mean padded width {width:.1f} tokens, {images:.1f} images encoded per batch "
                                   f"of {c.batch_size} captions"))
    for label in ("bucketed", "grouped"):
        figures.append(Figure(f"captioner steps/s, {label} / plain", rates[label] / rates["plain"], "x",
                              note=f"first {steps} batches of epoch 0 each way, {p.models.captioner.arch}"))
    return figures


@case("loading")
def loading_vs_steps(ctx: Context) -> list[Figure]:
    """Training DataLoader batches/s against the model's steps/s on the same batches, per family."""
    p = family_params(ctx)
    figures: list[Figure] = []
    for family in FAMILIES:
        figures += _rates_for(ctx, p, family)
    return figures + _batchings(ctx, p)
