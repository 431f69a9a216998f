"""Train one model family with PyTorch Lightning (one machine, CPU or GPU), tracked in MLflow.

DVC stage `train@<family>` (later issues): params `models.<family>`, `train`, `tracking`;
prepared data, vocabularies, embeddings -> {paths.models}/<family>/{best,last}.ckpt,
metrics/train_<family>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.io import write_json
from pipeline.params import Params, load_params
from pipeline.training.fit import FAMILIES, train


def run(p: Params, family: str, resume: bool = False) -> dict:
    """Fit `family`; write metrics/train_<family>.json and return it."""
    result = train(p, family, resume=resume)
    metrics = result.to_dict()
    write_json(Path(p.paths.metrics) / f"train_{family}.json", metrics)
    print(f"train {family}: best {result.monitor} {result.best_score:.4f} after {result.epochs} epochs; "
          f"checkpoint {result.best_checkpoint}")
    return metrics


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python -m stages.train {{{','.join(FAMILIES)}}}")
    run(load_params(), sys.argv[1])


if __name__ == "__main__":
    main()
