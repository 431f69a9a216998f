"""Matplotlib figures of the report, rendered to PNG (and handed to MLflow) by a FigureSink."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.params import LOG_DOMAINS  # noqa: E402
from pipeline.report.blocks import Figure  # noqa: E402

DPI = 100
LogFigure = Callable[[str, Any, str], bool]  # (run_id, matplotlib figure, artifact file) -> logged?


def to_png(fig: Any) -> bytes:
    """The figure as PNG bytes; no metadata, so the same figure gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


class FigureSink:
    """Turns matplotlib figures into report blocks; logs each to its MLflow run first when it has one."""

    def __init__(self, log: LogFigure | None = None) -> None:
        self.log = log
        self.logged: list[tuple[str, str]] = []  # (run_id, artifact file)

    def __call__(self, fig: Any, caption: str, artifact: str, run_id: str | None = None) -> Figure:
        try:
            png = to_png(fig)
            if self.log is not None and run_id and self.log(run_id, fig, artifact):
                self.logged.append((run_id, artifact))
        finally:
            plt.close(fig)
        return Figure(caption, png)


def image_figure(image: np.ndarray) -> Any:
    """A figure showing an (H, W, 3) uint8 image pixel for pixel."""
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.figimage(image, resize=False)
    return fig


def attention_strip(image: np.ndarray, words: list[str], attention: np.ndarray, cell: int = 128) -> np.ndarray:
    """The image, then one panel per word lit by its attention map (Xu et al. Fig. 2 style), as (H, W, 3) uint8.

    image: (3, S, S) uint8; attention: (T, N) over a square grid of N encoder positions, T = words (+1 for <end>).
    """
    from PIL import Image, ImageDraw

    steps, n = attention.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"attention over {n} positions is not a square grid")
    base = Image.fromarray(image.transpose(1, 2, 0)).resize((cell, cell), Image.Resampling.BICUBIC)
    labels = ["", *words, "<end>"][: steps + 1]
    strip = Image.new("RGB", (cell * len(labels), cell + 18), "white")
    strip.paste(base, (0, 0))
    for t in range(len(labels) - 1):
        alpha = attention[t].astype(np.float32).reshape(side, side)  # (side, side)
        alpha = (alpha / max(float(alpha.max()), 1e-8) * 255).astype(np.uint8)  # the peak at full light
        mask = Image.fromarray(alpha).resize((cell, cell), Image.Resampling.BILINEAR)
        lit = Image.composite(base, Image.new("RGB", base.size, "black"), mask)
        strip.paste(Image.blend(base, lit, 0.8), (cell * (t + 1), 0))
    draw = ImageDraw.Draw(strip)
    for t, word in enumerate(labels):
        draw.text((cell * t + 4, cell + 3), word, fill="black")
    return np.asarray(strip)


def learning_curve_figure(family: str, rows: Sequence[dict[str, float]]) -> Any:
    """Train and validation loss per epoch; a second panel for val CIDEr when the curve has it."""
    extra = [c for c in ("val_cider",) if any(c in r for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(5 * (1 + len(extra)), 3.2), squeeze=False)
    ax = axes[0][0]
    for column, style in (("train_loss", "o-"), ("val_loss", "s--")):
        pts = [(r["epoch"], r[column]) for r in rows if column in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=column.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize="small")
    for ax, column in zip(axes[0][1:], extra, strict=True):
        pts = [(r["epoch"], r[column]) for r in rows if column in r]
        ax.plot(*zip(*pts, strict=True), "o-", color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel(column.replace("_", " "))
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.suptitle(f"{family}: learning curve")
    fig.tight_layout()
    return fig


def axis_position(kind: str, args: Sequence[Any], value: Any) -> float:
    """Where a value sits on its parallel-coordinates axis, 0..1 over the searched range."""
    if kind == "choice":
        index = list(args).index(value) if value in args else 0
        return index / max(1, len(args) - 1)
    low, high = float(args[0]), float(args[1])
    x = float(value)
    if kind == "one_minus_loguniform":
        x = 1.0 - x
    if kind in LOG_DOMAINS:
        low, high, x = math.log10(low), math.log10(high), math.log10(max(x, 1e-300))
    return min(1.0, max(0.0, (x - low) / (high - low)))


def _axis_labels(kind: str, args: Sequence[Any]) -> tuple[list[float], list[str]]:
    """Tick positions and labels of one hyperparameter axis."""
    if kind == "choice":
        return [axis_position(kind, args, a) for a in args], [str(a) for a in args]
    prefix = "1-" if kind == "one_minus_loguniform" else ""
    return [0.0, 1.0], [f"{prefix}{args[0]:g}", f"{prefix}{args[1]:g}"]


def parallel_coordinates_figure(family: str, monitor: str, mode: str, trials: Sequence[dict[str, Any]],
                                space: dict[str, dict]) -> Any:
    """One line per scored trial across every hyperparameter axis and the metric, coloured by the metric.

    Log-scale keys sit on log axes (1 - value for one_minus_loguniform); choices are evenly spaced; the
    best trial is drawn thick; trials ASHA stopped early are dashed.
    """
    keys = list(space)
    scored = [t for t in trials if t.get("metric") is not None and math.isfinite(t["metric"])]
    values = [t["metric"] for t in scored]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    span = (hi - lo) or 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * (len(keys) + 1)), 3.6))
    cmap = plt.get_cmap("viridis")
    best = (max if mode == "max" else min)(scored, key=lambda t: t["metric"]) if scored else None
    for trial in sorted(scored, key=lambda t: (t["metric"], str(t.get("trial_id")))):
        ys = [axis_position(*next(iter(space[k].items())), trial["config"].get(k)) for k in keys]
        ys.append((trial["metric"] - lo) / span)
        goodness = ys[-1] if mode == "max" else 1.0 - ys[-1]
        ax.plot(range(len(ys)), ys, color=cmap(goodness), linewidth=3.0 if trial is best else 1.2,
                linestyle="--" if trial.get("status") == "early_stopped" else "-", alpha=0.9)
    for i, key in enumerate(keys):
        ax.axvline(i, color="0.6", linewidth=0.8)
        for y, label in zip(*_axis_labels(*next(iter(space[key].items()))), strict=True):
            ax.text(i + 0.03, y, label, fontsize=7, va="center")
    ax.axvline(len(keys), color="0.6", linewidth=0.8)
    for y, value in ((0.0, lo), (1.0, hi)):
        ax.text(len(keys) + 0.03, y, f"{value:.4g}", fontsize=7, va="center")
    ax.set_xticks(range(len(keys) + 1), [*(_short(k) for k in keys), monitor], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.1, len(keys) + 0.6)
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(f"{family} sweep: {len(scored)} scored trials (colour: {monitor}, {mode} is better)")
    fig.tight_layout()
    return fig


def _short(key: str) -> str:
    """The last two parts of a dotted params key (an axis label)."""
    return ".".join(key.split(".")[-2:])


def projection_figure(words: Sequence[str], points: np.ndarray, title: str) -> Any:
    """Words at their (N, 2) coordinates."""
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.scatter(points[:, 0], points[:, 1], s=6, color="tab:blue")
    for word, (x, y) in zip(words, points, strict=True):
        ax.annotate(word, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def pca_2d(matrix: np.ndarray) -> np.ndarray:
    """(N, D) rows projected on their two main principal components (N, 2); signs fixed for repeatability."""
    centred = matrix.astype(np.float64) - matrix.mean(axis=0, keepdims=True)  # (N, D)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # vt: (min(N, D), D)
    axes = vt[:2]  # (2, D)
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])  # largest loading positive
    points = centred @ (axes * signs[:, None]).T  # (N, 2)
    if points.shape[1] < 2:  # one word or one dimension: pad the missing axis
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    return points
