"""Figure builders: PNG rendering, the sink that logs to MLflow, axes of the sweep views, the projection."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from pipeline.report.figures import (
    FigureSink,
    attention_strip,
    axis_position,
    image_figure,
    learning_curve_figure,
    parallel_coordinates_figure,
    pca_2d,
    projection_figure,
    to_png,
)

SPACE = {"train.x.lr": {"loguniform": [1e-4, 1e-2]}, "train.x.beta1": {"one_minus_loguniform": [1e-3, 1e-1]},
         "models.x.dropout": {"uniform": [0.0, 0.5]}, "models.x.cell": {"choice": ["lstm", "gru", "rnn"]}}


def trial(trial_id: str, metric: float | None, status: str = "completed", **config) -> dict:
    base = {"train.x.lr": 1e-3, "train.x.beta1": 0.99, "models.x.dropout": 0.25, "models.x.cell": "gru"}
    return {"trial_id": trial_id, "status": status, "metric": metric, "config": {**base, **config}}


def test_image_figure_keeps_every_pixel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    png = to_png(image_figure(image))
    back = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert back.shape == image.shape and np.array_equal(back, image)


def test_the_same_figure_gives_the_same_bytes():
    rows = [{"epoch": 0, "train_loss": 2.0, "val_loss": 2.2}, {"epoch": 1, "train_loss": 1.5, "val_loss": 1.9}]
    assert to_png(learning_curve_figure("lstm_lm", rows)) == to_png(learning_curve_figure("lstm_lm", rows))


def test_learning_curve_has_a_cider_panel_only_when_the_curve_has_cider():
    rows = [{"epoch": 0, "train_loss": 2.0, "val_loss": 2.2}, {"epoch": 1, "train_loss": 1.5, "val_loss": 1.9}]
    lm = learning_curve_figure("lstm_lm", rows)
    assert len(lm.axes) == 1
    assert [line.get_label() for line in lm.axes[0].get_lines()] == ["train loss", "val loss"]
    assert list(lm.axes[0].get_lines()[1].get_ydata()) == [2.2, 1.9]
    cap = learning_curve_figure("captioner", [{**r, "val_cider": 0.1 * (i + 1)} for i, r in enumerate(rows)])
    assert len(cap.axes) == 2 and cap.axes[1].get_ylabel() == "val cider"
    plt.close("all")


@pytest.mark.parametrize(("kind", "args", "value", "expected"), [
    ("loguniform", [1e-4, 1e-2], 1e-3, 0.5),  # the middle of the range on a log scale
    ("one_minus_loguniform", [1e-3, 1e-1], 0.99, 0.5),  # 1 - 0.99 = 1e-2: the log-middle
    ("uniform", [0.0, 0.5], 0.125, 0.25),
    ("randint", [2, 6], 4, 0.5),
    ("choice", ["lstm", "gru", "rnn"], "rnn", 1.0),
    ("choice", ["lstm", "gru", "rnn"], "gru", 0.5),
    ("loguniform", [1e-4, 1e-2], 1.0, 1.0),  # outside the range: clipped to the axis
])
def test_axis_position(kind, args, value, expected):
    assert axis_position(kind, args, value) == pytest.approx(expected)


def test_parallel_coordinates_draw_one_line_per_scored_trial_best_thickest():
    trials = [trial("a", 2.0), trial("b", 1.0, "early_stopped", **{"train.x.lr": 1e-4}),
              trial("c", None, "errored"), trial("d", 3.0, **{"models.x.cell": "rnn"})]
    fig = parallel_coordinates_figure("x", "val/loss", "min", trials, SPACE)
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == len(SPACE) + 1]
    assert len(lines) == 3  # the errored trial has no metric
    by_metric = {round(float(line.get_ydata()[-1]), 6): line for line in lines}
    best = by_metric[0.0]  # val/loss 1.0 is the lowest metric: bottom of the metric axis, and best (min)
    assert best.get_linewidth() > max(line.get_linewidth() for line in lines if line is not best)
    assert best.get_linestyle() == "--"  # stopped early by ASHA
    assert list(best.get_ydata()[:2]) == pytest.approx([0.0, 0.5])  # lr at the bottom; beta1 0.99 halfway
    assert float(by_metric[1.0].get_ydata()[3]) == pytest.approx(1.0)  # the "rnn" choice at the top
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["x.lr", "x.beta1", "x.dropout", "x.cell", "val/loss"]
    plt.close(fig)


def test_parallel_coordinates_with_no_scored_trial_still_draws_the_axes():
    fig = parallel_coordinates_figure("x", "val/cider", "max", [trial("a", None, "errored")], SPACE)
    assert len(fig.axes[0].get_xticklabels()) == len(SPACE) + 1
    plt.close(fig)


def test_pca_recovers_the_main_directions_and_fixes_signs():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(50, 2))
    q, _ = np.linalg.qr(noise - noise.mean(axis=0))  # (50, 2) orthonormal, mean-zero columns
    base = q * [10.0, 1.0]  # variance mostly along the first axis, the two axes uncorrelated
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    data = np.hstack([base, np.zeros((50, 4))]) @ rotation.T  # (50, 6): a rotated 2-D cloud
    points = pca_2d(data)
    assert points.shape == (50, 2)
    for k in range(2):  # each component is the generating axis up to sign
        assert np.allclose(np.abs(points[:, k]), np.abs(base[:, k]))
    assert np.allclose(pca_2d(-data), -points)  # same axes (signs fixed), so the points mirror
    flipped = pca_2d(data @ np.diag([-1.0, 1, 1, 1, 1, 1]))  # a mirrored input still gives fixed signs
    assert np.allclose(np.abs(flipped), np.abs(points))


def test_the_sink_logs_only_figures_with_a_run_and_closes_every_figure():
    calls = []

    def log(run_id, fig, artifact):
        calls.append((run_id, artifact, fig.get_size_inches().tolist()))
        return run_id != "gone"

    sink = FigureSink(log)
    before = len(plt.get_fignums())
    words = ["red", "circle", "square"]
    a = sink(projection_figure(words, np.arange(6.0).reshape(3, 2), "t"), "with run", "report/a.png", "r1")
    b = sink(projection_figure(words, np.zeros((3, 2)), "t"), "no run", "report/b.png", None)
    sink(projection_figure(words, np.zeros((3, 2)), "t"), "missing run", "report/c.png", "gone")
    assert [c[:2] for c in calls] == [("r1", "report/a.png"), ("gone", "report/c.png")]
    assert sink.logged == [("r1", "report/a.png")]
    assert len(plt.get_fignums()) == before
    assert a.png.startswith(b"\x89PNG") and a.caption == "with run" and a.png != b.png
    assert a.data_uri.startswith("data:image/png;base64,iVBOR")


def test_attention_strip_lights_each_word_where_it_attends():
    image = np.full((3, 8, 8), 200, dtype=np.uint8)
    attention = np.zeros((3, 4), dtype=np.float16)  # (T, N): two words + <end> over a 2x2 grid
    attention[0, 0] = attention[1, 3] = attention[2, 1] = 1.0
    strip = attention_strip(image, ["red", "circle"], attention, cell=40)
    assert strip.shape == (40 + 18, 40 * 4, 3) and strip.dtype == np.uint8  # the image, then one panel per step
    first = strip[:40, 40:80].astype(int)  # "red": attends to the top-left quarter only
    assert first[:10, :10].mean() > first[30:, 30:].mean() + 100
    second = strip[:40, 80:120].astype(int)  # "circle": the bottom-right quarter
    assert second[30:, 30:].mean() > second[:10, :10].mean() + 100
    with pytest.raises(ValueError, match="not a square grid"):
        attention_strip(image, ["a"], np.ones((2, 15), dtype=np.float16))
