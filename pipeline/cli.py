"""The `capline` command line: data downloads, running stages with overrides, inspecting params."""

from __future__ import annotations

import importlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from pipeline.params import DEFAULT_PATH, ParamsError, load_params

app = typer.Typer(help="capline: DVC + Ray Tune + Lightning + MLflow pipeline for captioning and LMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Fetch public data sets.", no_args_is_help=True)
params_app = typer.Typer(help="Inspect and validate params.yaml.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(params_app, name="params")


class Stage(StrEnum):
    sample = "sample"
    prepare_coco = "prepare_coco"
    prepare_text = "prepare_text"
    vocab = "vocab"
    embeddings = "embeddings"
    features = "features"


class Family(StrEnum):
    captioner = "captioner"
    lstm_lm = "lstm_lm"
    transformer_lm = "transformer_lm"


class LanguageModel(StrEnum):
    lstm_lm = "lstm_lm"
    transformer_lm = "transformer_lm"


class Dataset(StrEnum):
    coco2017 = "coco2017"
    coco2014 = "coco2014"
    tinyshakespeare = "tinyshakespeare"
    wikitext2 = "wikitext2"


ParamsOpt = Annotated[Path, typer.Option("--params", help="Params file to load.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-S", help="Override a param: key=value (dotted key, YAML value). Repeatable.")]


def _load(params: Path, overrides: list[str] | None):
    try:
        return load_params(params, overrides or [])
    except ParamsError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def stage(name: Annotated[Stage, typer.Argument(help="DVC stage to run (its run(params)).")],
          params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None) -> None:
    """Run one stage's work directly (outside `dvc repro`), with optional --set overrides."""
    p = _load(params, set_)
    importlib.import_module(f"stages.{name.value}").run(p)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context) -> None:
    """`dvc repro` (any of its arguments), then a table of each stage's wall time; exits with DVC's status."""
    from pipeline.stage_times import repro as run_repro
    from pipeline.stage_times import summary

    status, times, total = run_repro(list(ctx.args), echo=typer.echo)
    if times:
        typer.echo("\n" + summary(times, total))
    raise typer.Exit(status)


CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="A .ckpt file (default: the family's best.ckpt under paths.models).")]


@app.command()
def train(family: Annotated[Family, typer.Argument(help="Model family to train.")],
          params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None,
          resume: Annotated[bool, typer.Option(
              help="Continue from the family's last.ckpt (if damaged: best.ckpt, with a warning).")] = False,
          ) -> None:
    """Train a model family with PyTorch Lightning on this machine (CPU or GPU); print the checkpoint."""
    from stages.train import run

    p = _load(params, set_)
    metrics = run(p, family.value, resume=resume)
    typer.echo(f"checkpoint: {metrics['best_checkpoint']}")


@app.command()
def sweep(family: Annotated[Family, typer.Argument(help="Model family to tune.")],
          params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None,
          address: Annotated[str | None, typer.Option(
              help="Ray cluster to run on (auto, ray://head:10001); default: sweep.ray_address or a local Ray.")]
          = None) -> None:
    """Random log-scale search with ASHA on Ray Tune; every trial a nested MLflow run. Resumes if interrupted."""
    from stages.sweep import run

    run(_load(params, set_), family.value, address=address)


@app.command()
def runs(family: Annotated[Family | None, typer.Argument(help="Only this family's latest sweep.")] = None,
         params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None) -> None:
    """Table of the latest sweep's trials, from MLflow (open `mlflow ui` for the full picture)."""
    from rich.console import Console
    from rich.table import Table

    from pipeline import tracking
    from pipeline.training.fit import MONITOR

    p = _load(params, set_)
    parent = tracking.latest_sweep(p.tracking.uri, p.tracking.experiment, family.value if family else None)
    if parent is None:
        typer.secho(f"no sweep in {p.tracking.uri} (experiment {p.tracking.experiment})", fg="yellow", err=True)
        raise typer.Exit(1)
    fam = parent["tags"]["family"]
    monitor = MONITOR[fam][0]
    space = list(getattr(p.sweep, fam).space)
    table = Table(title=f"sweep {fam}: MLflow run {parent['run_id']} ({parent['status']})")
    for column in ("trial", "run id", "status", monitor, *space):
        table.add_column(column)
    trials = tracking.child_runs(p.tracking.uri, p.tracking.experiment, parent["run_id"])
    for run in sorted(trials, key=lambda r: r["tags"].get("ray.trial_id", "")):
        value = run["metrics"].get(monitor, run["metrics"].get(monitor.replace("/", "_")))
        status = "diverged" if run["tags"].get("diverged") == "true" else run["status"]
        table.add_row(run["tags"].get("ray.trial_id", "?"), run["run_id"], status,
                      "" if value is None else f"{value:.4f}", *(run["params"].get(k, "") for k in space))
    Console().print(table)


@app.command()
def reproduce(run_id: Annotated[str, typer.Argument(help="MLflow run id of a sweep trial.")],
              tolerance: Annotated[float, typer.Option(help="Largest relative difference accepted.")] = 1e-3,
              params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None) -> None:
    """Rerun one trial outside Ray from its recorded config and seed; exit 1 if its metric differs."""
    from pipeline.reproduce import reproduce_trial

    report = reproduce_trial(_load(params, set_), run_id, tolerance)
    typer.echo(yaml.safe_dump(report, sort_keys=False))
    if report["data_changed"]:
        typer.secho(f"data changed since the trial: {', '.join(report['data_changed'])}", fg="yellow", err=True)
    if not report["within_tolerance"]:
        typer.secho(f"{report['monitor']} {report['reproduced']:.6g} differs from the recorded "
                    f"{report['recorded']:.6g} by more than {tolerance:g} (relative)", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def evaluate(family: Annotated[Family, typer.Argument(help="Model family to score.")],
             checkpoint: CheckpointOpt = None, params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None) -> None:
    """Score a trained model on the test split; write metrics/evaluate_<family>.json."""
    from stages.evaluate import run

    run(_load(params, set_), family.value, checkpoint)


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files to caption.")],
    beam: Annotated[int | None, typer.Option(help="Beam width (default: evaluate.beam_size).")] = None,
    attention_out: Annotated[Path | None, typer.Option(
        help="Folder for per-word attention overlays (PNG; show_attend_tell only).")] = None,
    checkpoint: CheckpointOpt = None, params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None,
) -> None:
    """Caption image files with a trained captioner."""
    from pipeline.inference import attention_strip, caption_images, load_images
    from pipeline.training.fit import checkpoint_path, load_module

    p = _load(params, set_)
    module = load_module("captioner", checkpoint or checkpoint_path(p, "captioner"))
    try:
        results = caption_images(module, images, beam or p.evaluate.beam_size, p.evaluate.alpha)
    except ValueError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from None
    for result in results:
        typer.echo(f"{result.path}: {result.text}")
        if attention_out is not None and result.attention is not None:
            attention_out.mkdir(parents=True, exist_ok=True)
            image = load_images([result.path], int(module.hparams["image_size"]))[0]
            out = attention_out / f"{result.path.stem}.attention.png"
            attention_strip(image, result.words, result.attention).save(out)
            typer.echo(f"  attention: {out}")
        elif attention_out is not None:
            typer.echo(f"  no attention maps: arch {module.model_cfg.arch} has no soft attention")


@app.command()
def generate(
    family: Annotated[LanguageModel, typer.Argument(help="Language model family.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "\n",
    temperature: Annotated[float, typer.Option(min=1e-3, help="Sampling temperature.")] = 0.8,
    length: Annotated[int | None, typer.Option(help="Tokens to generate (default: evaluate.sample_length).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens only.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the sampler.")] = 0,
    checkpoint: CheckpointOpt = None, params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None,
) -> None:
    """Sample text from a trained language model."""
    from pipeline.inference import generate as sample_text
    from pipeline.training.fit import checkpoint_path, load_module

    p = _load(params, set_)
    module = load_module(family.value, checkpoint or checkpoint_path(p, family.value))
    typer.echo(sample_text(module, prompt, length or p.evaluate.sample_length, temperature, top_k, seed))


@app.command()
def report(
    screenshot: Annotated[Path | None, typer.Option(
        help="Also save a PNG of the page rendered by headless Chromium (e.g. docs/report.png).")] = None,
    width: Annotated[int, typer.Option(min=320, help="Screenshot width in pixels.")] = 1280,
    height: Annotated[int, typer.Option(min=200, help="Screenshot height in pixels (the top of the page).")] = 2000,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while the sections are built.")] = True,
    params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None,
) -> None:
    """Write reports/index.html from what the pipeline produced (and log its figures to MLflow)."""
    from pipeline.report.browser import screenshot as take_screenshot
    from stages.report import report_path, run

    p = _load(params, set_)
    run(p, progress=progress)
    if screenshot is not None:
        try:
            take_screenshot(report_path(p), screenshot, width, height)
        except RuntimeError as err:
            typer.secho(str(err), fg="red", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"screenshot: {screenshot}")


@app.command()
def serve(
    family: Annotated[Family, typer.Argument(help="Registered model to serve (capline-<family>).")] = Family.captioner,
    alias: Annotated[str, typer.Option(help="Registry alias of the version to serve.")] = "champion",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5001,
    workers: Annotated[int, typer.Option(min=1, help="Server worker processes (each loads the model).")] = 1,
    params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None,
) -> None:
    """Serve a registered model over REST with `mlflow models serve` (POST /invocations).

    Captioner: {"dataframe_records": [{"image": "<base64 of an image file>"}]} -> {"predictions": ["a caption"]}.
    Language models: {"dataframe_records": [{"prompt": "The "}]} -> {"predictions": ["The ..."]}.
    """
    import os
    import sys

    from pipeline.tracking import serve_command

    p = _load(params, set_)
    argv, env = serve_command(p.tracking.uri, family.value, alias, host, port, workers)
    typer.echo(f"serving models:/capline-{family.value}@{alias} from {p.tracking.uri} on http://{host}:{port}",
               err=True)
    # mlflow starts `uvicorn` by name: this environment's bin first, even when it is not activated
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execve(argv[0], argv, {**os.environ, **env, "PATH": path})  # the server replaces this process


@params_app.command("show")
def params_show(params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None) -> None:
    """Print the validated params (after overrides) as YAML."""
    typer.echo(yaml.safe_dump(_load(params, set_).to_dict(), sort_keys=False))


@params_app.command("check")
def params_check(params: ParamsOpt = DEFAULT_PATH, set_: SetOpt = None) -> None:
    """Validate params; exit 2 with every bad key named when they are invalid."""
    _load(params, set_)
    typer.echo(f"{params}: ok")


@data_app.command("download")
def data_download(
    name: Annotated[Dataset, typer.Argument(help="Which data set.")],
    dest: Annotated[Path, typer.Option(help="The data set folder: files are fetched and unpacked here.")],
    base_url: Annotated[str | None, typer.Option(
        help="Mirror replacing each file's base URL (e.g. a local server).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    keep_archives: Annotated[bool, typer.Option(
        help="Keep archives after unpacking (--no-keep-archives saves ~19 GB for COCO train).")] = True,
) -> None:
    """Download a public data set with resume, checksum verification and safe extraction."""
    from pipeline.data.download import DownloadError, UnsafeArchiveError, download_dataset

    try:
        paths = download_dataset(name.value, dest, base_url=base_url, progress=progress,
                                 keep_archives=keep_archives)
    except (DownloadError, UnsafeArchiveError, ValueError, OSError) as err:
        typer.secho(f"capline data download {name.value}: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    for path in paths:
        typer.echo(str(path))


def main() -> None:
    """Entry point: known failures print one clear line (no traceback) and exit 1."""
    from pipeline.training.callbacks import NonFiniteLossError

    try:
        app()
    except (FileNotFoundError, NotADirectoryError, ValueError, NonFiniteLossError) as err:
        typer.secho(f"capline: {err}", fg="red", err=True)
        raise SystemExit(1) from None
