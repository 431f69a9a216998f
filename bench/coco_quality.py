"""Captioning quality on real photos: `python -m bench.coco_quality [--splits 5] [--set KEY=VALUE ...]`.

The real-image recipe (REAL_IMAGES, over params.yaml) on ../shared/data/coco-sample, once per held-out split:
each split is a seeded draw of `test` images capline never trains on (and `val` for early stopping), the rest
train. Per split: the stages prepare_coco, vocab, features, then `capline train` and `evaluate` in-process, with
the nearest-neighbour baseline (nn_*) and a constant caption scored on the same test images in the same run.
Prints a markdown table (mean ± standard deviation over splits) and writes bench/results/coco_quality.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, SHARED_DATA, machine, now
from pipeline.io import write_json
from pipeline.params import Params, load_params, parse_assignments

log = logging.getLogger("bench.coco_quality")

COCO = SHARED_DATA / "coco-sample"
# The documented real-image recipe (README "Quality on real photos"): frozen pretrained encoder, its features
# extracted once, soft attention over the 7x7 grid, beam search without <unk> and repeated trigrams, its captions
# reranked by the captions of the 10 nearest training images (consensus reranking).
REAL_IMAGES: dict[str, Any] = {
    "prepare_coco.image_size": 224, "prepare_coco.split.val": 10, "prepare_coco.split.test": 36,
    "vocab.sources": ["captions"], "vocab.min_freq": 2,
    "features.enabled": True,
    "models.captioner.encoder": "efficientnet_lite0", "models.captioner.freeze_encoder": True,
    "models.captioner.arch": "show_attend_tell", "models.captioner.dropout": 0.5,
    "train.captioner.max_epochs": 15, "train.captioner.batch_size": 32, "train.captioner.label_smoothing": 0.1,
    "train.captioner.scheduled_sampling": [0.0, 0.0], "train.captioner.early_stopping_patience": 0,
    "train.captioner.scst_epochs": 10,
    "evaluate.beam_size": 5, "evaluate.meteor": True, "evaluate.rerank_neighbours": 10,
}
MEMBERS = 3  # captioners per split decoded as one ensemble (each ~2.3 min of training on one AMD EPYC thread)
SHOWN = ("bleu_4", "meteor", "cider")
FLAWS = ("captions_with_unk", "captions_with_repeated_3gram")
CONSTANT_CAPTION = "a man is sitting on a table with a plate of food ."  # frequent COCO words, one for all


def split_params(root: Path, split: int, overrides: dict[str, Any]) -> Params:
    """params.yaml + REAL_IMAGES + overrides, every path under root/split-<n>, seed 1000 + n."""
    work = root / f"split-{split}"
    paths = {f"paths.{k}": str(work / k) for k in ("coco", "text", "vocab", "encoded", "embeddings", "features",
                                                   "models", "metrics")}
    return load_params(ROOT / "params.yaml", {
        **paths, "data.coco.annotations": str(COCO / "annotations" / "captions.json"),
        "data.coco.images": str(COCO / "images"), "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "seed": 1000 + split, **REAL_IMAGES, **overrides})


def member_params(p: Params, member: int) -> Params:
    """The same recipe and prepared split for ensemble member `member` >= 1: its own seed and models folder."""
    return p.overridden({"seed": p.seed + 100 * member,
                             "paths.models": str(Path(p.paths.models).with_name(f"models-member-{member}"))})


def run_split(p: Params, members: int = 1) -> dict[str, Any]:
    """Prepare, extract, train (`members` captioners, seeds apart) and evaluate one held-out split, decoding the
    members as one ensemble; its scores, baselines and caption flaws."""
    from pipeline.evaluation import evaluate
    from pipeline.metrics import caption_scores
    from pipeline.runtime import set_threads
    from pipeline.training.datamodules import CaptionDataModule
    from pipeline.training.fit import train
    from stages import embeddings, features, prepare_coco, prepare_text, vocab

    set_threads(p.runtime.threads)
    with contextlib.redirect_stdout(io.StringIO()):
        for stage in (prepare_coco, prepare_text, vocab, features):
            stage.run(p)
        if p.models.captioner.pretrained_embeddings:
            embeddings.run(p)
    started = time.perf_counter()
    result = train(p, "captioner", logger=False)
    others = [train(member_params(p, i), "captioner", logger=False).best_checkpoint for i in range(1, members)]
    train_s = time.perf_counter() - started
    scores = evaluate(p.overridden({"evaluate.captioner_ensemble": others}), "captioner", result.best_checkpoint)
    refs = CaptionDataModule(p.paths.coco, None, 1, 1, 0, p.seed).references("test")
    constant = caption_scores(refs, {k: CONSTANT_CAPTION for k in refs}, meteor=False)
    return {**{k: scores[k] for k in (*SHOWN, *FLAWS)}, **{f"nn_{k}": scores[f"nn_{k}"] for k in SHOWN},
            **{k: scores[k] for k in ("beam_cider", "reranked_fraction") if k in scores},
            "constant_cider": constant["cider"], "constant_bleu_4": constant["bleu_4"], "images": scores["images"],
            "epochs": result.epochs, "members": members, "train_seconds": round(train_s, 1)}


def summary(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per numeric key: [mean, standard deviation] over the splits."""
    out = {}
    for key in runs[0]:
        values = [float(r[key]) for r in runs]
        out[key] = [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
    return out


def table(agg: dict[str, list[float]], members: int) -> str:
    """Markdown: the model, the nearest-neighbour caption and the constant caption, mean ± sd."""
    def cell(key: str) -> str:
        return f"{agg[key][0]:.3f} ± {agg[key][1]:.3f}" if key in agg else "n/a"

    lines = ["| system | BLEU-4 | METEOR | CIDEr |", "|---|---|---|---|",
             f"| capline ({REAL_IMAGES['models.captioner.arch']}, frozen {REAL_IMAGES['models.captioner.encoder']}"
             f"{f', ensemble of {members}' if members > 1 else ''}) | {cell('bleu_4')} | {cell('meteor')} | "
             f"{cell('cider')} |",
             f"| the same model, beam's own best caption (no reranking) | n/a | n/a | {cell('beam_cider')} |",
             f"| nearest training image's caption | {cell('nn_bleu_4')} | {cell('nn_meteor')} | {cell('nn_cider')} |",
             f"| one constant caption | {cell('constant_bleu_4')} | n/a | {cell('constant_cider')} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.coco_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5, help="held-out splits (seeds 1000, 1001, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    parser.add_argument("--members", type=int, default=MEMBERS,
                        help=f"captioners per split (seeds 100 apart) decoded as one ensemble (default {MEMBERS})")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR and keep it (prepared splits, checkpoints, captions); default: a temp dir")
    args = parser.parse_args(argv)
    if not (COCO / "annotations" / "captions.json").is_file():
        sys.exit(f"bench.coco_quality: needs {COCO} (../shared/data/coco-sample)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = parse_assignments(args.set)
    runs = []
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="capline-coco-quality-"))
        for split in range(args.splits):
            runs.append(run_split(split_params(Path(tmp), split, overrides), args.members))
            log.info("split %d: %s", split, json.dumps(runs[-1]))
    agg = summary(runs)
    ratio = [r["cider"] / r["nn_cider"] for r in runs if r["nn_cider"] > 0]
    record = {"date": now(), "machine": machine(), "command": "python -m bench.coco_quality " + " ".join(
        f"--set {s}" for s in args.set) + f" --splits {args.splits} --members {args.members}",
        "recipe": {**REAL_IMAGES, **overrides}, "members": args.members,
        "splits": runs, "summary": agg, "cider_over_nn": statistics.fmean(ratio) if ratio else None}
    write_json(RESULTS_DIR / "coco_quality.json", record)
    print(table(agg, args.members))
    print(f"CIDEr / nearest-neighbour CIDEr: {record['cider_over_nn']:.2f} (mean over splits); captions with "
          f"<unk>: {sum(r['captions_with_unk'] for r in runs)}, with a repeated trigram: "
          f"{sum(r['captions_with_repeated_3gram'] for r in runs)} of {sum(r['images'] for r in runs)}")


if __name__ == "__main__":
    main()
