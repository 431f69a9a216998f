"""Score a trained model family on the test split.

DVC stage `evaluate@<family>` (later issues): {paths.models}/<family>/best.ckpt + test data
-> metrics/evaluate_<family>.json (captioner: BLEU-1..4, METEOR, ROUGE-L, CIDEr with beam search;
language models: test loss, perplexity, bits per character and the unigram baseline)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.evaluation import evaluate
from pipeline.io import write_json
from pipeline.params import Params, load_params
from pipeline.training.fit import FAMILIES, checkpoint_path


def run(p: Params, family: str, checkpoint: str | Path | None = None) -> dict:
    """Evaluate `family` (default checkpoint: its best.ckpt); write metrics/evaluate_<family>.json."""
    ckpt = Path(checkpoint) if checkpoint else checkpoint_path(p, family, "best")
    metrics = evaluate(p, family, ckpt)
    write_json(Path(p.paths.metrics) / f"evaluate_{family}.json", metrics)
    shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(f"evaluate {family}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return metrics


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python -m stages.evaluate {{{','.join(FAMILIES)}}}")
    run(load_params(), sys.argv[1])


if __name__ == "__main__":
    main()
