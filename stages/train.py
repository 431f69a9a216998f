"""Train one model family with PyTorch Lightning (one machine, CPU or GPU), tracked in MLflow.

DVC stage `train@<family>` (`python -m stages.train <family> --best`): the sweep's best configuration
({paths.sweeps}/<family>/best.json) applied over params, trained for train.<family>.max_epochs, registered
in the MLflow Model Registry as `capline-<family>` with the alias `champion`
-> {paths.models}/<family>/{best,last}.ckpt, metrics/train_<family>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.io import read_json, write_json
from pipeline.params import Params, apply_overrides, load_params, validate_params
from pipeline.runtime import set_threads
from pipeline.training.fit import FAMILIES, train
from stages import best_path, entry


def with_best_config(p: Params, family: str) -> tuple[Params, dict]:
    """Params with the sweep's winning overrides applied (validated like any override)."""
    path = best_path(p, family)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep result (run: dvc repro sweep@{family}, or capline sweep {family})")
    overrides = read_json(path).get("overrides")
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: field 'overrides' must be an object of dotted params keys")
    return validate_params(apply_overrides(p.to_dict(), overrides, source=str(path)), source=str(path)), overrides


def run(p: Params, family: str, resume: bool = False, best: bool = False, register: bool = False) -> dict:
    """Fit `family` (optionally with the sweep's best config); write metrics/train_<family>.json."""
    set_threads(p.runtime.threads)
    overrides: dict = {}
    if best:
        p, overrides = with_best_config(p, family)
    result = train(p, family, resume=resume)
    metrics = {**result.to_dict(), "overrides": overrides}
    metrics.pop("history")  # the learning curve travels in the checkpoint; evaluate@ plots it
    if register and result.run_id:
        from pipeline import tracking

        served = {"beam_size": p.evaluate.beam_size, "alpha": p.evaluate.alpha,  # serve as evaluation decodes
                  "sample_length": p.evaluate.sample_length, **p.serve.model_dump(exclude={"max_request_bytes"})}
        metrics["registered"] = tracking.register_checkpoint(
            p.tracking.uri, result.run_id, family, result.best_checkpoint, served, alias="champion")
    write_json(Path(p.paths.metrics) / f"train_{family}.json", metrics)
    print(f"train {family}: best {result.monitor} {result.best_score:.4f} after {result.epochs} epochs; "
          f"checkpoint {result.best_checkpoint}")
    return metrics


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in FAMILIES or set(args[1:]) - {"--best"}:
        sys.exit(f"usage: python -m stages.train {{{','.join(FAMILIES)}}} [--best]")
    best = "--best" in args
    entry(lambda: run(load_params(), args[0], best=best, register=best))


if __name__ == "__main__":
    main()
