"""Gather the report's inputs from the pipeline's outputs and build its sections, one step at a time.

Every part copes with missing inputs (no sweep yet, no evaluation, no MLflow run): its section says
what to run instead of failing. Nothing here decodes or loads a model: test captions, attention maps and
samples are those evaluate@<family> wrote (pipeline/report/examples.py), so the same inputs give the same page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.families import FAMILIES, LANGUAGE_MODELS
from pipeline.params import Params
from pipeline.redact import redact
from pipeline.report.blocks import Section, missing
from pipeline.report.examples import examples_dir, read_caption_examples, read_samples
from pipeline.report.figures import FigureSink, LogFigure, pca_2d
from pipeline.report.sections import (
    LanguageModelData,
    SweepData,
    captioner_section,
    curves_section,
    embeddings_section,
    language_models_section,
    metrics_section,
    sweeps_section,
)
from pipeline.report.sources import (
    captioned_images,
    dvc_metrics_diff,
    frequent_words,
    metrics_files,
    read_curve,
    read_metrics,
    read_optional_json,
)

log = logging.getLogger(__name__)

OWN_METRICS = "report.json"  # the report's own metrics file: never shown (it would depend on the last report)


class ReportBuilder:
    """Reads params' paths and the MLflow store; `steps()` are the sections in order, each a callable."""

    def __init__(self, p: Params, repo_dir: Path, sink: FigureSink, report_run_id: str | None = None) -> None:
        self.p, self.repo_dir, self.sink, self.report_run_id = p, repo_dir, sink, report_run_id
        self.metrics_dir = Path(p.paths.metrics)

    def steps(self) -> list[tuple[str, Callable[[], Section]]]:
        return [("captioner", self.captioner), ("learning curves", self.curves), ("sweeps", self.sweeps),
                ("language models", self.language_models), ("embeddings", self.embeddings),
                ("metrics", self.metrics)]

    def _json(self, name: str) -> dict[str, Any] | None:
        return read_optional_json(self.metrics_dir / name)

    def run_id(self, family: str) -> str | None:
        """The MLflow run of the family's final training (from metrics/train_<family>.json)."""
        return (self._json(f"train_{family}.json") or {}).get("run_id")

    def metrics(self) -> Section:
        diff, note = dvc_metrics_diff(self.repo_dir)
        return metrics_section(metrics_files(self.metrics_dir, exclude=(OWN_METRICS,)), diff, note)

    def captioner(self) -> Section:
        folder = examples_dir(self.p, "captioner")
        examples = read_caption_examples(folder)
        if examples is None:
            return captioner_section(None, f"No test captions in {folder} yet (run: dvc repro evaluate@captioner).",
                                     None, "", False, self.sink, None)
        captions = captioned_images(examples.images, Path(self.p.paths.coco) / "test" / "images.npy")
        return captioner_section(captions, "", self._json("evaluate_captioner.json"), examples.arch,
                                 examples.attends, self.sink, self.run_id("captioner"))

    def curves(self) -> Section:
        curves = {f: read_curve(self.metrics_dir / f"curve_{f}.csv") for f in FAMILIES}
        return curves_section(curves, self.sink, {f: self.run_id(f) for f in FAMILIES})

    def sweeps(self) -> Section:
        return sweeps_section([self._sweep(f) for f in FAMILIES], self.sink)

    def _sweep(self, family: str) -> SweepData:
        monitor, mode = FAMILIES[family].monitor, FAMILIES[family].mode
        summary = read_metrics(self.metrics_dir, f"sweep_{family}.json")  # its timings too (metrics/timings/)
        data = SweepData(family, monitor, mode, dict(getattr(self.p.sweep, family).space), summary, None)
        if summary is not None:
            data.trials, data.why_no_trials = sweep_trials(self.p.tracking.uri, summary.get("parent_run_id"))
        return data

    def language_models(self) -> Section:
        models = [LanguageModelData(f, self._json(f"evaluate_{f}.json"), read_samples(examples_dir(self.p, f)))
                  for f in LANGUAGE_MODELS]
        return language_models_section(models)

    def embeddings(self) -> Section:
        summary = self._json("embeddings.json")
        matrix_path = Path(self.p.paths.embeddings) / "words.npy"
        if summary is None or not matrix_path.is_file():
            return missing("embeddings", "Word embeddings", "No embeddings yet (run: dvc repro embeddings).")
        words, vectors = frequent_words(Path(self.p.paths.vocab) / "words.json", np.load(matrix_path),
                                        self.p.report.projection_words)
        points = pca_2d(vectors) if len(words) >= 2 else None
        return embeddings_section(summary, words, points, self.sink, self.report_run_id)


def sweep_trials(uri: str, parent_run_id: str | None) -> tuple[list[dict[str, Any]] | None, str]:
    """The trial records a sweep logged to its MLflow parent run (sweep/summary.json), or why there are none."""
    from pipeline import tracking

    if not parent_run_id:
        return None, "the sweep's metrics name no MLflow run"
    if not tracking.run_exists(uri, parent_run_id):
        return None, f"MLflow run {parent_run_id} is not in {redact(uri)}"
    try:
        summary = tracking.load_artifact_dict(uri, parent_run_id, "sweep/summary.json")
    except FileNotFoundError as err:
        return None, str(err)
    trials = summary.get("trials")
    if not isinstance(trials, list) or not all(isinstance(t, dict) and isinstance(t.get("config"), dict)
                                               for t in trials):
        return None, f"MLflow run {parent_run_id}: sweep/summary.json has no list of trial records"
    return trials, ""


def mlflow_figure_log(uri: str) -> LogFigure:
    """log_figure to runs of `uri` that exist; a run missing from the store is skipped with a warning."""
    from pipeline import tracking

    known: dict[str, bool] = {}

    def log_one(run_id: str, fig: Any, artifact: str) -> bool:
        if run_id not in known:
            known[run_id] = tracking.run_exists(uri, run_id)
            if not known[run_id]:
                log.warning("MLflow run %s is not in %s: its report figures are not logged there", run_id,
                            redact(uri))
        if known[run_id]:
            tracking.log_figure(run_id, fig, artifact)
        return known[run_id]

    return log_one
