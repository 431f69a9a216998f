"""Train one model family with PyTorch Lightning (one machine, CPU or GPU), tracked in MLflow.

DVC stage `train@<family>` (`python -m stages.train <family> --best`): the sweep's best configuration
({paths.sweeps}/<family>/best.json) applied over params, trained for train.<family>.max_epochs, registered
in the MLflow Model Registry as `capline-<family>` with the alias `champion`
-> {paths.models}/<family>/{best,last}.ckpt, metrics/train_<family>.json

The folder is a persistent DVC output: an interrupted `dvc repro` leaves its checkpoints, and the rerun
continues from last.ckpt when the params and the data are those it was started with (`resume_key.json`,
removed when training completes); otherwise the folder is cleared and training starts over.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.families import FAMILIES
from pipeline.families import family as family_record
from pipeline.io import read_json, write_json, write_metrics
from pipeline.params import Params, load_params
from pipeline.runtime import set_threads
from pipeline.training.checkpoints import checkpoint_path
from pipeline.training.fit import data_paths, run_params, train
from stages import best_path, entry


def with_best_config(p: Params, family: str) -> tuple[Params, dict]:
    """Params with the sweep's winning overrides applied (validated like any override)."""
    path = best_path(p, family)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep result (run: dvc repro sweep@{family}, or capline sweep {family})")
    overrides = read_json(path).get("overrides")
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: field 'overrides' must be an object of dotted params keys")
    return p.overridden(overrides, source=str(path)), overrides


RESUME_KEY = "resume_key.json"
DATA = ("coco", "text", "vocab", "encoded", "embeddings", "features")  # paths whose DVC hashes a run depends on


def resume_key(p: Params, family: str) -> str:
    """Hash of what the family's checkpoints depend on: the params (best config applied) and the data's DVC hashes."""
    from pipeline import tracking  # here: a GPU box without mlflow still trains with `capline train`

    data = tracking.dvc_hashes_under(tracking.lineage_tags(Path.cwd()), [getattr(p.paths, k) for k in DATA])
    return tracking.params_hash({"family": family, "params": p.to_dict(), "data": data})


def continue_or_clear(p: Params, family: str) -> bool:
    """True when the folder holds an interrupted run of these params and data to continue; else clear it."""
    folder, key = checkpoint_path(p, family).parent, resume_key(p, family)
    marker = folder / RESUME_KEY
    if (folder / "last.ckpt").is_file() and marker.is_file() and read_json(marker).get("key") == key:
        print(f"train {family}: continuing the interrupted run from {folder / 'last.ckpt'} (same params and data)",
              flush=True)
        return True
    shutil.rmtree(folder, ignore_errors=True)  # another run's checkpoints, or a finished one's: start over
    write_json(marker, {"key": key})
    return False


def tracked_logger(p: Params, family: str) -> Any:
    """A Lightning logger into a new MLflow run of the training, tagged with its lineage, params logged once."""
    from pipeline import tracking  # here: a GPU box without mlflow still trains (train(..., logger=None))

    lineage = tracking.lineage_tags(Path.cwd())
    mlf = tracking.lightning_logger(p.tracking.uri, p.tracking.experiment, run_name=f"train-{family}",
                                    tags={"family": family, "params_hash": tracking.params_hash(p.to_dict()),
                                          **lineage})
    tracking.log_params_flat(mlf.run_id, run_params(p, family))
    tracking.log_data_inputs(mlf.run_id, lineage, data_paths(p, family))  # MLflow's Datasets column
    return mlf


def register_champion(p: Params, family: str, run_id: str, checkpoint: str) -> dict[str, str]:
    """Register the checkpoint as capline-<family>@champion, served as evaluate@ decodes it (a captioner: with
    evaluate.captioner_ensemble's members and evaluate.rerank_neighbours' training images)."""
    from pipeline import tracking
    from pipeline.served_files import decoding_files

    e = p.evaluate
    served = {"beam_size": e.beam_size, "alpha": e.alpha, "no_repeat_ngram": e.no_repeat_ngram,
              "ensemble_members": 1, "rerank_neighbours": 0, "rerank_weight": 0.0, "sample_length": e.sample_length,
              **p.serve.model_dump(exclude={"max_request_bytes"})}
    with tempfile.TemporaryDirectory(prefix="capline-served-") as tmp:
        extra = {}
        if family_record(family).captions:
            extra = decoding_files(p, checkpoint, Path(tmp))
            served.update(ensemble_members=1 + len(e.captioner_ensemble), rerank_neighbours=e.rerank_neighbours,
                          rerank_weight=e.rerank_weight)
        return tracking.register_checkpoint(p.tracking.uri, run_id, family, checkpoint, served, alias="champion",
                                            extra=extra)


def run(p: Params, family: str, resume: bool = False, best: bool = False, register: bool = False,
        persist: bool = False) -> dict:
    """Fit `family` (optionally with the sweep's best config); write metrics/train_<family>.json.

    persist: the DVC stage's way (see the module's docstring): continue an interrupted run of the same
    params and data, else start over in an empty folder.
    """
    set_threads(p.runtime.threads)
    overrides: dict = {}
    if best:
        p, overrides = with_best_config(p, family)
    if persist:
        resume = continue_or_clear(p, family)
    result = train(p, family, resume=resume, logger=tracked_logger(p, family))
    if persist:
        (checkpoint_path(p, family).parent / RESUME_KEY).unlink(missing_ok=True)  # finished: never continued
    metrics = {**result.to_dict(), "overrides": overrides}
    metrics.pop("history")  # the learning curve travels in the checkpoint; evaluate@ plots it
    if result.run_id and Path(result.best_checkpoint).is_file():
        from pipeline import tracking

        tracking.log_artifact(result.run_id, result.best_checkpoint, "checkpoints")
    if register and result.run_id:
        metrics["registered"] = register_champion(p, family, result.run_id, result.best_checkpoint)
    write_metrics(Path(p.paths.metrics) / f"train_{family}.json", metrics)
    print(f"train {family}: best {result.monitor} {result.best_score:.4f} after {result.epochs} epochs; "
          f"checkpoint {result.best_checkpoint}")
    return metrics


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in FAMILIES or set(args[1:]) - {"--best"}:
        sys.exit(f"usage: python -m stages.train {{{','.join(FAMILIES)}}} [--best]")
    best = "--best" in args
    entry(lambda: run(load_params(), args[0], best=best, register=best, persist=best))


if __name__ == "__main__":
    main()
