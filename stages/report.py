"""The report: one self-contained HTML page of what the pipeline produced, its figures also in MLflow.

DVC stage `report`: metrics/*.json, metrics/curve_<family>.csv, what evaluate@<family> wrote for it
({paths.evaluation}: test captions, attention maps, samples), the prepared test images and the embeddings ->
{paths.reports}/index.html, metrics/report.json. It renders, it never decodes: no model is loaded. Parts not
produced yet (no sweep, no evaluation) are named in the page with the command that makes them.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from pipeline.io import write_metrics, write_text
from pipeline.params import Params, load_params
from pipeline.report.blocks import Section
from pipeline.report.build import ReportBuilder, mlflow_figure_log
from pipeline.report.figures import FigureSink
from pipeline.report.html import render
from stages import entry


def report_path(p: Params) -> Path:
    """Where the page is written."""
    return Path(p.paths.reports) / "index.html"


def build_sections(builder: ReportBuilder, progress: bool) -> list[Section]:
    """Every section in order, with a progress bar (figures and `dvc metrics diff` take a few seconds)."""
    sections = []
    with Progress(disable=not progress, transient=True) as bar:
        steps = builder.steps()
        task = bar.add_task("report", total=len(steps))
        for name, step in steps:
            bar.update(task, description=f"report: {name}")
            sections.append(step())
            bar.advance(task)
    return sections


def run(p: Params, repo_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Build reports/index.html (and log its figures to MLflow); write metrics/report.json."""
    # no set_threads as the other stages do: it would import torch, and nothing here runs a model
    repo = Path(repo_dir) if repo_dir is not None else Path.cwd()
    run_id, log = None, None
    if p.report.log_to_mlflow:
        from pipeline import tracking

        run_id = tracking.create_run(p.tracking.uri, p.tracking.experiment, "report",
                                     tags={"capline.kind": "report", **tracking.lineage_tags(repo)})
        log = mlflow_figure_log(p.tracking.uri)
    sink, status = FigureSink(log), "FAILED"
    try:
        sections = build_sections(ReportBuilder(p, repo, sink, run_id), progress)
        html = render(sections)
        write_text(report_path(p), html)
        if run_id:
            tracking.log_artifact(run_id, report_path(p), "report")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run_id:
            tracking.end_run(status, run_id)
    metrics = {"sections": {s.id: "missing" if s.missing else "shown" for s in sections},
               "figures": sum(len(s.figures()) for s in sections), "html_bytes": len(html.encode("utf-8")),
               "mlflow_figures": len(sink.logged), "mlflow_run_id": run_id}
    write_metrics(Path(p.paths.metrics) / "report.json", metrics)
    shown = [k for k, v in metrics["sections"].items() if v == "shown"]
    print(f"report: {report_path(p)} ({metrics['html_bytes'] / 1e6:.1f} MB, {metrics['figures']} figures; "
          f"sections shown: {', '.join(shown) or 'none'}; {metrics['mlflow_figures']} figures logged to MLflow)")
    return metrics


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
