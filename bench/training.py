"""Training throughput of every model family: tokens/s (language models), images/s (each captioner), and on
a GPU the model FLOP utilisation against its bf16 peak.

A timed run is `steps` optimiser steps of the real model, loss and optimiser (the family's, fused on CUDA) on
one fixed synthetic batch, under bf16 autocast on a GPU (what `train.precision: auto` gives) and fp32 on a CPU.
No Lightning loop and no data loading: those are the `loading` case. On a CPU the configurations are the
params.yaml defaults (the README's quality runs); on a GPU they are the issue's target configurations.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import Context, Figure, case, machine
from bench.flops import counted_flops, lm_flops_per_token, mfu
from bench.workspace import prepared
from pipeline.models.captioners import ShowAttendTell
from pipeline.models.encoders import HALF, ImageEncoder
from pipeline.params import Params
from pipeline.tokens import SPECIALS, START_ID
from pipeline.training.modules import CaptioningModule, sequence_loss
from pipeline.training.optim import build_optimizer

Batch = dict[str, Tensor]


@dataclasses.dataclass
class Workload:
    """A network, how to make a batch of b items, its loss, and what one step processes."""

    name: str
    net: nn.Module  # what the optimiser updates
    make_batch: Callable[[int, torch.device], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    batch_size: int
    units_per_item: int  # tokens per sequence, or 1 image
    unit: str
    optim: Any  # the family's train section (optimiser settings)
    flops_per_item: float | None = None  # analytic, when known; else counted at batch 2
    targets: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)  # (what, op, bound)


def tokens_of(size: int) -> list[str]:
    """A vocabulary of `size` tokens (the specials first), for a model's output layer."""
    return [*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))]


def lm_workload(p: Params, family: str, vocab: int, batch: int, **model: Any) -> Workload:
    """A language model of params.models.<family> (with `model` overrides) on random token windows."""
    from pipeline.models.language_models import build_language_model

    section = getattr(p.models, family).model_copy(update=model)
    seq = p.train.lstm_lm.bptt if family == "lstm_lm" else section.context
    net = build_language_model(family, section, vocab)

    def make_batch(b: int, device: torch.device) -> Batch:
        ids = torch.randint(len(SPECIALS), vocab, (b, seq + 1), device=device)  # (B, T+1)
        return {"inputs": ids[:, :-1], "targets": ids[:, 1:]}

    def loss(m: nn.Module, bt: Batch) -> Tensor:
        return sequence_loss(m(None, bt["inputs"])[0], bt["targets"])

    return Workload(f"{family} ({section.level})", net, make_batch, loss, batch, seq, "tokens/s",
                    getattr(p.train, family), lm_flops_per_token(net, seq) * seq)


def captioner_workload(p: Params, arch: str, vocab: int, image_size: int, batch: int, **model: Any) -> Workload:
    """A captioner (CaptioningModule: teacher forcing, its loss and regulariser) on random images and captions."""
    cfg = p.models.captioner.model_copy(update={"arch": arch, "max_len": 20, **model})  # random 20-token captions
    module = CaptioningModule(cfg.model_dump(), p.train.captioner.model_dump(), tokens_of(vocab), image_size)
    t = cfg.max_len

    def make_batch(b: int, device: torch.device) -> Batch:
        caps = torch.randint(len(SPECIALS), vocab, (b, t + 1), device=device)  # (B, T+1)
        caps[:, 0] = START_ID
        return {"images": torch.randint(0, 256, (b, 3, image_size, image_size), dtype=torch.uint8, device=device),
                "captions": caps}

    def loss(m: nn.Module, bt: Batch) -> Tensor:
        return m._loss(m.encode_batch(bt), bt["captions"])  # the training step minus logging

    return Workload(f"captioner {arch} ({cfg.encoder} {image_size}px)", module, make_batch, loss, batch, 1,
                    "images/s", p.train.captioner)


class PrecomputedFeatures(ImageEncoder):
    """Stands in for a frozen CNN whose (B, C, h, w) features were extracted once, before training."""

    def __init__(self, channels: int) -> None:
        super().__init__(HALF, HALF)
        self.out_channels = channels

    def tail(self, n: int) -> list[nn.Module]:
        return []


def features_workload(p: Params, vocab: int, batch: int, channels: int = 2048, grid: int = 7,
                      **model: Any) -> Workload:
    """show_attend_tell on pre-extracted (C, grid, grid) features (ResNet-50 at 224 px: 2048 x 7 x 7)."""
    w = captioner_workload(p, "show_attend_tell", vocab, 32, batch, **model)
    cfg = w.net.model_cfg
    w.net.model = ShowAttendTell(PrecomputedFeatures(channels), vocab, cfg.embed_size, cfg.hidden_size,
                                 cfg.attention, cfg.attention_size, cfg.dropout)
    make_captions = w.make_batch

    def make_batch(b: int, device: torch.device) -> Batch:
        feats = torch.randn(b, channels, grid, grid, device=device)  # (B, C, h, w)
        return {"features": feats, "captions": make_captions(b, device)["captions"]}

    def loss(m: nn.Module, bt: Batch) -> Tensor:
        memory = m.model.feature_proj(bt["features"].flatten(2).transpose(1, 2))  # (B, N, D)
        return m._loss(memory, bt["captions"])

    return dataclasses.replace(w, name=f"captioner show_attend_tell (features {channels}x{grid}x{grid})",
                               make_batch=make_batch, loss=loss)


def step_fn(w: Workload, batch: Batch, device: torch.device, compile_model: bool = False
            ) -> Callable[[Batch | None], None]:
    """step(b=None): one optimiser step of w on b (default `batch`): bf16 autocast and fused optimiser on CUDA."""
    net = w.net.to(device).train()
    if compile_model:  # like `capline train`: the network, in place (a LightningModule wraps it as .model)
        getattr(net, "model", net).compile()
    opt = build_optimizer([{"params": [q for q in net.parameters() if q.requires_grad]}], w.optim, device.type)
    bf16 = device.type == "cuda"

    def step(b: Batch | None = None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = w.loss(net, batch if b is None else b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def flops_per_item(w: Workload) -> float:
    """Training FLOPs per batch item: analytic when known, else counted on a CPU copy at batch 2."""
    if w.flops_per_item is not None:
        return w.flops_per_item
    return counted_flops(w.net, lambda m: w.loss(m, w.make_batch(2, torch.device("cpu")))) / 2


def measure(ctx: Context, w: Workload, steps: int) -> list[Figure]:
    """Throughput (median of repeats of `steps` steps), model TFLOP/s and MFU; targets checked."""
    device = ctx.device
    flops = flops_per_item(w)  # before the model moves
    step = step_fn(w, w.make_batch(w.batch_size, device), device, ctx.compile)
    timing = ctx.timed(lambda: [step() for _ in range(steps)])
    items = w.batch_size * steps
    rate, spread = timing.rate(items * w.units_per_item)
    achieved = flops * items / timing.median
    params = sum(q.numel() for q in w.net.parameters()) / 1e6
    values = {"rate": (f"{w.name}: throughput", rate, w.unit, spread,
                       f"batch {w.batch_size}, {params:.1f}M params, {flops / w.units_per_item / 1e6:.1f} MFLOP "
                       f"per {w.unit.split('/')[0][:-1]}"),
              "tflops": (f"{w.name}: model FLOP/s", achieved / 1e12, "TFLOP/s", None, "")}
    if device.type == "cuda":
        values["mfu"] = (f"{w.name}: MFU", mfu(achieved, machine()["gpu_bf16_peak_tflops"]),
                         "fraction of bf16 peak", None, "")
    bounds = {what: (op, bound) for what, op, bound in w.targets}
    figures = []
    for what, (name, value, unit, spr, note) in values.items():
        if what in bounds:
            figures.append(Figure.check(name, value, unit, *bounds[what], spread=spr, note=note))
        else:
            figures.append(Figure(name, value, unit, spread=spr, note=note))
    return figures


def cpu_workloads(ctx: Context) -> list[Workload]:
    """params.yaml's defaults with the workspace's vocabulary sizes and image size."""
    from pipeline.training.fit import vocabulary

    p = prepared(ctx)
    words, chars = len(vocabulary(p, "captioner")), len(vocabulary(p, "lstm_lm"))
    size, b = p.prepare_coco.image_size, p.train.captioner.batch_size
    return [lm_workload(p, "lstm_lm", chars, p.train.lstm_lm.batch_size),
            lm_workload(p, "transformer_lm", chars, p.train.transformer_lm.batch_size),
            *(captioner_workload(p, arch, words, size, b) for arch in ("show_tell", "show_attend_tell", "transformer")),
            features_workload(p, words, b, channels=256 if ctx.quick else 2048)]


def gpu_workloads(ctx: Context) -> list[Workload]:
    """The issue's GPU targets: word LSTM 32k x 1024 at batch 256, a ~110M transformer, captioners."""
    p = prepared(ctx)
    lstm = lm_workload(p, "lstm_lm", 32000, 256, level="word", embed_size=1024, hidden_size=1024, layers=2,
                       dropout=0.0, tie_weights=True)
    lstm.targets = [("rate", ">=", 500_000)]
    gpt = lm_workload(p, "transformer_lm", 32000, 16, level="word", d_model=768, layers=12, heads=12,
                      ff_size=3072, context=1024, dropout=0.0)
    gpt.targets = [("mfu", ">=", 0.30)]
    feats = features_workload(p, 10000, 512, embed_size=512, hidden_size=512, attention_size=512)
    feats.targets = [("rate", ">=", 5000)]
    size = p.prepare_coco.image_size
    return [lstm, gpt, feats, *(captioner_workload(p, arch, 10000, size, 256)
                                for arch in ("show_tell", "show_attend_tell", "transformer"))]


def thread_scaling(ctx: Context, steps: int) -> list[Figure]:
    """The default captioner's steps/s with 1 intra-op thread and with one per core (CPU only)."""
    cores, before = os.cpu_count() or 1, torch.get_num_threads()
    from pipeline.training.fit import vocabulary

    p = prepared(ctx)
    w = captioner_workload(p, p.models.captioner.arch, len(vocabulary(p, "captioner")), p.prepare_coco.image_size,
                           p.train.captioner.batch_size)
    step = step_fn(w, w.make_batch(w.batch_size, ctx.device), ctx.device)
    rates = {}
    try:
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            rates[threads] = w.batch_size * steps / ctx.timed(lambda: [step() for _ in range(steps)]).median
    finally:
        torch.set_num_threads(before)
    note = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {r:,.1f} images/s" for t, r in rates.items())
    return [Figure(f"{w.name}: {cores} intra-op threads / 1", rates[cores] / rates[1], "x",
                   note=note + "; below 1: the extra threads cost more than they give (shared or throttled cores)")]


@case("training")
def training_throughput(ctx: Context) -> list[Figure]:
    """Training steps/s of every family: tokens/s, images/s per captioner; MFU on a GPU."""
    gpu = ctx.device.type == "cuda"
    workloads = gpu_workloads(ctx) if gpu else cpu_workloads(ctx)
    steps = 1 if ctx.quick else (20 if gpu else 3)
    figures: list[Figure] = []
    for w in workloads:
        figures += measure(ctx, w, steps)
        w.net.cpu()  # free the GPU for the next workload
        if gpu:
            torch.cuda.empty_cache()
    if not gpu and (os.cpu_count() or 1) > 1:
        figures += thread_scaling(ctx, steps)
    return figures
