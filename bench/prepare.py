"""prepare_coco: decoded images/s per process and the speed-up from 1 to N decode processes.

Runs on ../shared/data/coco-sample when present (real COCO JPEGs), else on generated JPEGs of COCO size
(640x480, textured so that they compress to roughly COCO's ~160 KB). Each timed run is the stage's hot path,
`write_stream` (decode, resize, crop, write into the memory-mapped split array), through a pool that stays up
across the runs, so the figures are steady-state rates; the pool's start-up is reported on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import statistics
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from bench.common import SHARED_DATA, Context, Figure, case, time_runs
from pipeline.data.images import Decoder, write_stream

COCO_SIZE = (640, 480)
GENERATED = 180  # like the coco-sample's 179
QUICK_IMAGES = 24
# Small chunks: ~180 images must give every process many tasks, or the speed-up measures load imbalance
# (the stage's default of 64 suits 100k images, where thousands of chunks balance themselves).
CHUNK = 8
# Each timed run decodes the images over and over, at least this many decodes (a few seconds): over a single
# pass of ~180 images (half a second) the pool's tail, its last chunks running while the other worker
# idles, cost 5-8% of the speed-up, which a real data set (thousands of chunks) never sees.
MIN_DECODES = 1000
SIZES = (256, 64)  # 256: COCO with a CNN; 64: the default params (JPEG draft mode decodes at 1/4 scale)


def generate_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n textured COCO-size JPEGs (quality 90): smooth colour fields, a few shapes, sensor-like noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = COCO_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        base = rng.uniform(0, 255, 3)[:, None, None] * (0.5 + 0.5 * np.sin(xx / rng.uniform(20, 200)
                                                                         + yy / rng.uniform(20, 200)))
        for _ in range(4):  # blobs
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 150)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            base[:, inside] = rng.uniform(0, 255, 3)[:, None]
        pixels = base + rng.normal(0, 14, (3, h, w))  # (3, H, W): texture keeps the file near COCO's size
        rgb = np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        path = folder / f"{i:012d}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
        paths.append(str(path))
    return paths


def source_images(ctx: Context) -> tuple[list[str], str]:
    """(JPEG paths, a description): the COCO sample when present, else generated ones (cached per run)."""
    if "prepare_images" not in ctx.cache:
        sample = SHARED_DATA / "coco-sample" / "images"
        paths = sorted(str(p) for p in sample.glob("*.jpg")) if sample.is_dir() else []
        what = f"{len(paths)} COCO images (../shared/data/coco-sample)"
        if not paths:
            paths = generate_jpegs(ctx.scratch / "coco_size_jpegs", GENERATED)
            what = f"{len(paths)} generated 640x480 JPEGs"
        if ctx.quick:
            paths = paths[:QUICK_IMAGES]
        mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
        ctx.cache["prepare_images"] = (paths, f"{what}, mean {mean_kb:.0f} KB")
    return ctx.cache["prepare_images"]


@dataclasses.dataclass
class Rates:
    """Steady-state images/s (median, spread), CPU-seconds the decode used per image, the cold-pool cost."""

    rate: float
    spread: list[float]
    cpu_per_image: float
    startup: float


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the decode pool)."""
    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in (me, *me.children(recursive=True)))


def _rates(ctx: Context, paths: list[str], workers: int, size: int, out: Path) -> Rates:
    """write_stream with `workers` processes through a pool that stays up across the runs."""
    cpu: list[float] = []
    paths = paths * max(1, math.ceil(MIN_DECODES / len(paths))) if not ctx.quick else paths

    def once() -> None:
        before = cpu_seconds()
        write_stream(decoder, paths, [("train", None)], out, lambda *a: None, lambda n: None)
        cpu.append(cpu_seconds() - before)

    with Decoder(workers, size, CHUNK) as decoder:
        cold = time_runs(once, repeats=1, warmup=0)  # the first run also starts the pool (spawn + imports)
        timing = ctx.timed(once)
    rate, spread = timing.rate(len(paths))
    return Rates(rate, spread, statistics.median(cpu[1:]) / len(paths), max(0.0, cold.seconds[0] - timing.median))


@case("prepare")
def prepare_throughput(ctx: Context) -> list[Figure]:
    """prepare_coco decode+resize+write: images/s per process, speed-up from 1 to N processes."""
    paths, what = source_images(ctx)
    n = max(2, os.cpu_count() or 1)
    figures = []
    for size in SIZES:
        one = _rates(ctx, paths, 1, size, ctx.scratch / "prepare_out")
        many = _rates(ctx, paths, n, size, ctx.scratch / "prepare_out")
        # the share of n cores the n processes actually got: below 1, other load on the machine took the rest
        share = many.rate * many.cpu_per_image / n
        figures += [
            Figure.check(f"S={size}: 1 process", one.rate, "images/s", ">=", 150, spread=one.spread, note=what),
            Figure(f"S={size}: 1 process, by CPU time", 1 / one.cpu_per_image, "images/CPU-s",
                   note="images per CPU-second: what a process would do on a core of its own"),
            Figure(f"S={size}: {n} processes", many.rate, "images/s", spread=many.spread,
                   note=f"{many.rate / n:,.0f} images/s per process; the processes got {share:.0%} of {n} cores"),
            _speedup(f"S={size}: speed-up 1->{n} processes", many.rate / one.rate, n),
            Figure(f"S={size}: CPU cost per image, {n} processes / 1", many.cpu_per_image / one.cpu_per_image,
                   "x", note="above 1: work the pool adds (task IPC, the parent copying rows out of the staging file)"),
            Figure(f"S={size}: pool start-up ({n} processes)", many.startup, "s",
                   note="first run minus the median: spawn + imports, once per stage run"),
        ]
    figures += _stage_end_to_end(ctx, n)
    return figures


def _speedup(name: str, ratio: float, n: int) -> Figure:
    """The issue's target is for 2 processes (this machine class); other counts are reported only."""
    note = "ratio of the two medians, same run"
    if n == 2:
        return Figure.check(name, ratio, "x", ">=", 1.8, note=note)
    return Figure(name, ratio, "x", note=note)


def _stage_end_to_end(ctx: Context, workers: int) -> list[Figure]:
    """The whole prepare_coco (captions JSON, split, decode, write, manifest) on the COCO sample, if present."""
    sample = SHARED_DATA / "coco-sample"
    if not sample.is_dir() or ctx.quick:
        return []
    from pipeline.data.coco import prepare_coco

    def once() -> None:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            prepare_coco(ctx.scratch / "prepare_stage", sample / "annotations/captions.json", sample / "images",
                         val_annotations=None, val_images=None, image_size=256, val=20, test=20, seed=0,
                         max_skipped_fraction=0.05, workers=workers, chunk_size=CHUNK, max_caption_tokens=50)

    timing = ctx.timed(once)
    images = len(list((sample / "images").glob("*.jpg")))
    rate, spread = timing.rate(images)
    return [Figure(f"stage end to end, S=256, {workers} processes", rate, "images/s", spread=spread,
                   note="includes pool start-up, captions JSON, tokenising and the manifest's sha256")]
