"""What the `features` stage buys: captioner training steps with a frozen EfficientNet-Lite0 run on the images
every step, against the same steps on its pre-extracted float16 features; and what extracting them costs.

Both workloads are the default captioner (params.yaml's arch and sizes, the workspace's vocabulary and image
size) with `encoder: efficientnet_lite0, freeze_encoder: true`, on the same batch size, steps only (no loading;
that is the `loading` case). On a CPU everything runs on one intra-op thread, like a sweep trial's worker.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.common import Context, Figure, case
from bench.flops import counted_flops
from bench.training import Batch, Workload, captioner_workload, measure
from bench.workspace import prepared
from pipeline.training.datasets import LazyArray
from pipeline.training.features import extract_features
from pipeline.training.fit import vocabulary

FROZEN = {"encoder": "efficientnet_lite0", "freeze_encoder": True, "finetune_blocks": 0}


def features_of(w: Workload, dtype: torch.dtype = torch.float16) -> Workload:
    """The same module and batch size, fed the frozen encoder's stored features instead of images."""
    encoder = w.net.model.encoder
    make_images = w.make_batch

    def make_batch(b: int, device: torch.device) -> Batch:
        batch = make_images(b, device)
        with torch.no_grad():
            feats = encoder.to(device).eval()(batch["images"]).to(dtype)  # (B, C, h, w) as stored on disk
        return {"features": feats, "captions": batch["captions"]}

    def loss(m, bt: Batch) -> torch.Tensor:
        return m._loss(m.encode_batch(bt), bt["captions"])  # the training step minus logging

    two = make_batch(2, torch.device("cpu"))  # made outside the FLOP counter: the encoder's work is not the step's
    flops = counted_flops(w.net, lambda m: loss(m, two)) / 2
    return dataclasses.replace(w, name=w.name.replace("px)", "px, pre-extracted float16 features)"),
                               make_batch=make_batch, loss=loss, flops_per_item=flops)


def extraction_rate(ctx: Context, w: Workload) -> Figure:
    """Images/s of extract_features over the workspace's training split (what the stage costs per image)."""
    p = prepared(ctx)
    images = LazyArray(f"{p.paths.coco}/train/images.npy")
    encoder = w.net.model.encoder.to(ctx.device)
    out = ctx.scratch / "features-bench" / "train.npy"
    timing = ctx.timed(lambda: extract_features(encoder, images, p.features.batch_size, out, "float16"))
    rate, spread = timing.rate(len(images))
    return Figure(f"features stage: {FROZEN['encoder']} extraction", rate, "images/s",
                  spread=spread, note=f"{len(images)} images, batch {p.features.batch_size}, float16")


@case("features")
def features_speedup(ctx: Context) -> list[Figure]:
    """Captioner training images/s with a frozen EfficientNet-Lite0: from images vs from pre-extracted features."""
    p = prepared(ctx)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        on_images = captioner_workload(p, p.models.captioner.arch, len(vocabulary(p, "captioner")),
                                       p.prepare_coco.image_size, p.train.captioner.batch_size, **FROZEN)
        on_features = features_of(on_images)
        steps = 1 if ctx.quick else (20 if ctx.device.type == "cuda" else 5)
        figures = measure(ctx, on_images, steps)[:1] + measure(ctx, on_features, steps)[:1]
        figures.append(Figure("features / images: training speed-up", figures[1].value / figures[0].value, "x",
                              note=f"same batch of {on_images.batch_size}, {steps} steps per run, "
                                   f"{torch.get_num_threads()} thread(s)"))
        figures.append(extraction_rate(ctx, on_images))
    finally:
        torch.set_num_threads(threads)
    return figures
