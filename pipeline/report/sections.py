"""Build each report section from data already read (see build.py for where the data come from)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.report.blocks import Example, Sample, Section, Table, Text, missing
from pipeline.report.examples import LanguageModelSamples
from pipeline.report.figures import (
    FigureSink,
    attention_strip,
    image_figure,
    learning_curve_figure,
    parallel_coordinates_figure,
    projection_figure,
)
from pipeline.report.sources import CaptionedImage

CAPTION_SCORES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "beam_cider", "beam_size",
                  "rerank_neighbours", "ensemble_members", "search_error_fraction", "images")
LM_SCORES = ("level", "test_loss", "perplexity", "bits_per_char", "unigram_bits_per_char")
SHOWN_PIXELS = 128  # test images are small (prepare_coco.image_size): shown at least this wide


def metrics_section(files: dict[str, dict[str, float]], diff: dict[str, dict] | None, note: str) -> Section:
    """Every numeric metric of metrics/*.json, one table per file; HEAD's value and the change when diffed."""
    title = "Metrics"
    if not files:
        return missing("metrics", title, "No metrics files yet (run: dvc repro).")
    blocks: list[Any] = [Text(f"dvc metrics diff: {note}." if diff is not None else note)]
    for name, metrics in files.items():
        if diff is None:
            blocks.append(Table(name, ["metric", "value"], [[k, v] for k, v in metrics.items()]))
            continue
        entries = diff.get(name, {})
        rows = [[k, v, entries.get(k, {}).get("old"), entries.get(k, {}).get("diff")] for k, v in metrics.items()]
        blocks.append(Table(name, ["metric", "value", "HEAD", "change"], rows))
    return Section("metrics", title, blocks)


def _enlarged(image: np.ndarray) -> np.ndarray:
    """(3, S, S) uint8 -> (H, W, 3), scaled up (nearest) to at least SHOWN_PIXELS wide."""
    hwc = image.transpose(1, 2, 0)
    factor = max(1, -(-SHOWN_PIXELS // hwc.shape[1]))  # ceiling division
    return np.ascontiguousarray(hwc.repeat(factor, axis=0).repeat(factor, axis=1))


def captioner_section(captions: Sequence[CaptionedImage] | None, why_missing: str, scores: dict | None,
                      arch: str, attends: bool, sink: FigureSink, run_id: str | None) -> Section:
    """Test images: the caption evaluation scored beside the references; per-word attention strips when kept."""
    title = "Captioner: test images"
    if captions is None:
        return missing("captioner", title, why_missing)
    blocks: list[Any] = []
    if scores is not None:
        shown = [k for k in CAPTION_SCORES if k in scores]
        rows = [["model", *(scores[k] for k in shown)]]
        if any(f"nn_{k}" in scores for k in shown):  # the baseline: copy the nearest training image's caption
            rows.append(["nearest training image's caption", *(scores.get(f"nn_{k}") for k in shown)])
        blocks.append(Table("test-split scores (metrics/evaluate_captioner.json)", ["system", *shown], rows))
    for i, item in enumerate(captions):
        ex = item.example
        image = sink(image_figure(_enlarged(item.image)), f"test image {ex.image_id}",
                     f"report/captioner/test_{i}.png", run_id)
        strip = None
        if ex.attention is not None:
            strip = sink(image_figure(attention_strip(item.image, ex.words, ex.attention)),
                         f"attention of each word of: {ex.caption}", f"report/captioner/attention_{i}.png", run_id)
        blocks.append(Example(f"image {ex.image_id} ({ex.file_name})", image, ex.caption, ex.references, strip))
    if not attends:
        blocks.append(Text(f"No attention strips: arch {arch} has no per-word soft attention over the image."))
    return Section("captioner", title, blocks)


def curves_section(curves: dict[str, list[dict[str, float]] | None], sink: FigureSink,
                   run_ids: dict[str, str | None]) -> Section:
    """Train and validation loss per epoch of each final model (metrics/curve_<family>.csv)."""
    title = "Learning curves"
    blocks: list[Any] = []
    for family, rows in curves.items():
        if not rows:
            blocks.append(Text(f"{family}: no learning curve yet (run: dvc repro evaluate@{family}).", note=True))
            continue
        blocks.append(sink(learning_curve_figure(family, rows), f"{family}: loss per epoch (train and validation)",
                           "report/learning_curve.png", run_ids.get(family)))
    return Section("curves", title, blocks, missing=not any(curves.values()))


@dataclass
class SweepData:
    """What the report knows of one family's latest sweep."""

    family: str
    monitor: str
    mode: str
    space: dict[str, dict]
    summary: dict[str, Any] | None  # metrics/sweep_<family>.json
    trials: list[dict[str, Any]] | None  # TrialRecord dicts from MLflow; None when unavailable
    why_no_trials: str = ""


def sweep_blocks(data: SweepData, sink: FigureSink) -> list[Any]:
    """One family's sweep: counts, the best configuration, metric against each hyperparameter, parallel coords."""
    s = data.summary
    if s is None:
        return [Text(f"{data.family}: no sweep yet (run: dvc repro sweep@{data.family}).", note=True)]
    best = s.get("best_config") or {}
    blocks: list[Any] = [
        Table(f"{data.family}: {s.get('trials')} trials, best {data.monitor} ({data.mode})",
              ["completed", "stopped early (ASHA)", "errored", f"best {data.monitor}", "ASHA savings",
               "wall seconds"],
              [[s.get("completed"), s.get("early_stopped"), s.get("errored"), s.get("best_metric"),
                s.get("asha_savings"), s.get("wall_seconds")]]),
        Table(f"{data.family}: best configuration (trial {s.get('best_trial_id')})", ["params key", "value"],
              [[k, v] for k, v in best.items()])]
    if data.trials is None:
        return [*blocks, Text(f"{data.family}: per-trial results unavailable ({data.why_no_trials}).", note=True)]
    run_id = s.get("parent_run_id")
    blocks.append(sink(metric_vs_params(data), f"{data.family}: best {data.monitor} of each trial against each "
                       "hyperparameter (log axes for log-scale ones)", "report/metric_vs_params.png", run_id))
    blocks.append(sink(parallel_coordinates_figure(data.family, data.monitor, data.mode, data.trials, data.space),
                       f"{data.family}: parallel coordinates of the trials", "report/parallel_coordinates.png",
                       run_id))
    keys = list(data.space)
    rows = [[t.get("trial_id"), t.get("status"), t.get("metric"), t.get("epochs"),
             *(t.get("config", {}).get(k) for k in keys)] for t in data.trials]
    blocks.append(Table(f"{data.family}: trials", ["trial", "status", data.monitor, "epochs", *keys], rows))
    return blocks


def metric_vs_params(data: SweepData) -> Any:
    """The sweep's own summary figure (the one logged by the sweep), rebuilt from its trial records."""
    from pipeline.sweep_results import TrialRecord, metric_figure, summarise

    names = TrialRecord.__dataclass_fields__
    trials = [TrialRecord(**{k: v for k, v in t.items() if k in names}) for t in data.trials or []]
    result = summarise(data.family, data.monitor, data.mode, trials, experiment_path="",
                       parent_run_id=None, wall_seconds=0.0, epochs_budget=0)
    return metric_figure(result, data.space)


def sweeps_section(sweeps: Sequence[SweepData], sink: FigureSink) -> Section:
    """Every family's sweep, or what to run when there is none yet."""
    blocks = [b for data in sweeps for b in sweep_blocks(data, sink)]
    return Section("sweeps", "Sweeps", blocks, missing=all(d.summary is None for d in sweeps))


@dataclass
class LanguageModelData:
    """One language model: its test scores and the samples evaluation drew from it, each None until written."""

    family: str
    scores: dict[str, Any] | None
    samples: LanguageModelSamples | None


def language_models_section(models: Sequence[LanguageModelData]) -> Section:
    """Perplexity and bits per character on the test split, and samples at several temperatures."""
    blocks: list[Any] = []
    for m in models:
        if m.scores is not None:
            shown = [k for k in LM_SCORES if k in m.scores]
            ratio = _ratio(m.scores)
            blocks.append(Table(f"{m.family}: test split (metrics/evaluate_{m.family}.json)",
                                [*shown, *(["bits / unigram bits"] if ratio is not None else [])],
                                [[*(m.scores[k] for k in shown), *([ratio] if ratio is not None else [])]]))
        if m.samples is None:
            blocks.append(Text(f"{m.family}: no samples yet (run: dvc repro evaluate@{m.family}).", note=True))
            continue
        blocks.extend(Sample(f"{m.family}, temperature {t:g}, prompt {m.samples.prompt!r}", text)
                      for t, text in m.samples.samples)
    return Section("language-models", "Language models", blocks,
                   missing=all(m.samples is None and m.scores is None for m in models))


def _ratio(scores: dict[str, Any]) -> float | None:
    bpc, base = scores.get("bits_per_char"), scores.get("unigram_bits_per_char")
    return bpc / base if isinstance(bpc, int | float) and isinstance(base, int | float) and base else None


def embeddings_section(summary: dict[str, Any] | None, words: list[str], points: np.ndarray | None,
                       sink: FigureSink, run_id: str | None) -> Section:
    """Nearest neighbours of the probe words (metrics/embeddings.json) and a 2-D PCA of frequent words."""
    title = "Word embeddings"
    if summary is None:
        return missing("embeddings", title, "No embeddings yet (run: dvc repro embeddings).")
    rows = [[word, ", ".join(f"{n} ({s:.2f})" for n, s in neighbours)]
            for word, neighbours in (summary.get("probe") or {}).items()]
    blocks: list[Any] = [Table(f"{summary.get('method')} vectors, dim {summary.get('dim')}: nearest neighbours "
                               "(cosine)", ["word", "neighbours"], rows)]
    if summary.get("missing_probe_words"):
        blocks.append(Text("Not in the vocabulary: " + ", ".join(summary["missing_probe_words"]) + "."))
    if points is None or len(words) < 2:
        blocks.append(Text("No projection: fewer than two trained word vectors to place.", note=True))
    else:
        caption = f"the {len(words)} most frequent words on the first two principal components"
        blocks.append(sink(projection_figure(words, points, caption), caption, "report/embeddings_pca.png", run_id))
    return Section("embeddings", title, blocks)

