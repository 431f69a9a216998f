"""Score a trained model family on the test split.

DVC stage `evaluate@<family>`: {paths.models}/<family>/best.ckpt + test data
-> metrics/evaluate_<family>.json (captioner: BLEU-1..4, METEOR, ROUGE-L, CIDEr with beam search;
language models: test loss, perplexity, bits per character and the unigram baseline), metrics/curve_<family>.csv,
and what the report shows, {paths.evaluation}/<family>/ (captioner: the first report.test_images test captions
exactly as scored, with attention maps; language models: seeded samples of report.prompt per evaluate.temperatures)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import tracking
from pipeline.evaluation import run_evaluation
from pipeline.families import FAMILIES
from pipeline.io import atomic_open, read_json, write_metrics
from pipeline.params import Params, load_params
from pipeline.report.examples import examples_dir, write_examples
from pipeline.runtime import set_threads
from pipeline.training.checkpoints import checkpoint_path, learning_curve
from stages import entry

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_cider")


def write_curve(path: Path, history: list[dict[str, float]]) -> None:
    """The learning curve as CSV for `dvc plots` (x = epoch)."""
    with atomic_open(path) as fh:
        columns = [c for c in CURVE_COLUMNS if any(c in row for row in history)] or ["epoch"]
        fh.write(",".join(columns) + "\n")
        for row in history:
            fh.write(",".join(f"{row[c]:g}" if c in row else "" for c in columns) + "\n")


def log_to_training_run(p: Params, family: str, ckpt: Path, metrics: dict) -> str | None:
    """Log the scores as test/<metric> into the MLflow run of the train stage that wrote `ckpt`; its id or None."""
    record_path = Path(p.paths.metrics) / f"train_{family}.json"
    record = read_json(record_path) if record_path.is_file() else {}
    run_id, trained = record.get("run_id"), record.get("best_checkpoint")
    if not run_id or not trained or Path(trained).resolve() != ckpt.resolve():
        return None  # a checkpoint the train stage did not write: no run to add to
    if not tracking.run_exists(p.tracking.uri, run_id):
        log.warning("MLflow run %s (%s) is not in the store: test scores not logged there", run_id, record_path)
        return None
    tracking.log_metrics(run_id, {f"test/{k}": v for k, v in metrics.items()})
    registered = record.get("registered") or {}
    if registered.get("name") and registered.get("version"):
        tracking.record_scores(p.tracking.uri, registered["name"], registered["version"], metrics,
                               headline(family, metrics))
    return run_id


def headline(family: str, m: dict) -> str:
    """One line a reader of the model registry wants: the test scores against the baseline."""
    if FAMILIES[family].captions:
        return (f"test split ({m['images']} images): BLEU-4 {m['bleu_4']:.3f}, CIDEr {m['cider']:.3f}; copying the "
                f"nearest training image's caption: BLEU-4 {m['nn_bleu_4']:.3f}, CIDEr {m['nn_cider']:.3f}")
    return (f"test split ({m['tokens']:,} {m['level']} tokens): perplexity {m['perplexity']:.2f}, "
            f"{m['bits_per_char']:.3f} bits/char; unigram model: {m['unigram_bits_per_char']:.3f} bits/char")


def run(p: Params, family: str, checkpoint: str | Path | None = None) -> dict:
    """Evaluate `family` (default: its best.ckpt); write metrics/evaluate_<family>.json, its learning curve and
    {paths.evaluation}/<family>/ for the report.

    The scores also go to the final model's MLflow run as test/<metric>, beside its training curves, and to its
    registered model version (test.<metric> tags and a one-line description).
    """
    set_threads(p.runtime.threads)
    ckpt = Path(checkpoint) if checkpoint else checkpoint_path(p, family, "best")
    result = run_evaluation(p, family, ckpt)
    metrics = result.metrics
    metrics["run_id"] = log_to_training_run(p, family, ckpt, metrics)
    write_examples(examples_dir(p, family), result.examples)
    write_metrics(Path(p.paths.metrics) / f"evaluate_{family}.json", metrics)
    last = ckpt.with_name("last.ckpt")  # the full run's history; best.ckpt stops at the best epoch
    write_curve(Path(p.paths.metrics) / f"curve_{family}.csv", learning_curve(last if last.is_file() else ckpt))
    shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(f"evaluate {family}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return metrics


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python -m stages.evaluate {{{','.join(FAMILIES)}}}")
    entry(lambda: run(load_params(), sys.argv[1]))


if __name__ == "__main__":
    main()
