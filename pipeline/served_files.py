"""A captioner decoded as evaluation decodes it, anywhere: the training images reranking votes with, and the
files a registered captioner carries beside its checkpoint (its ensemble's other members, those images).

Kept apart from evaluation so that train@ (which registers the champion) depends on this, not on the scoring code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.baselines import pooled_features
from pipeline.params import Params
from pipeline.rerank import Neighbours, save_neighbours
from pipeline.training.checkpoints import captioner_ensemble, load_module
from pipeline.training.fit import build_datamodule, vocabulary
from pipeline.training.modules import CaptioningModule
from pipeline.training.scst import CiderD


def caption_neighbours(p: Params, module: CaptioningModule, k: int) -> Neighbours:
    """For reranking captions of any image over its k nearest prepared training images (`capline caption`): those
    images' pooled features on the module's encoder and a CIDEr-D over their captions."""
    captions = Path(p.paths.coco) / "train" / "captions.jsonl"
    if not captions.is_file():
        raise FileNotFoundError(f"{captions}: no prepared training captions to rerank over (run `dvc repro "
                                f"prepare_coco`, or rerank 0: --rerank 0 / evaluate.rerank_neighbours: 0)")
    dm = build_datamodule(p, "captioner", vocabulary(p, "captioner"), use_features=False)
    # no dm.setup(): only the split's images and captions are read, not training pairs (nor their max_len warning)
    trained_at = int(module.hparams["image_size"])
    if dm.image_size != trained_at:
        raise ValueError(f"{captions.parent}: the prepared training images are {dm.image_size} px, the captioner was "
                         f"trained on {trained_at} px: rerank over the images it was trained on (its params)")
    train = pooled_features(module.model.encoder, dm.images_dataloader("train"), module.device)
    return Neighbours(train, CiderD(dm.references("train")), k, p.evaluate.rerank_weight)


def decoding_files(p: Params, checkpoint: str | Path, folder: Path) -> dict[str, Path]:
    """What a registered captioner decodes with beside its checkpoint, as evaluate@captioner does, written into
    folder by artifact name: copies of the evaluate.captioner_ensemble members (`member-<i>`: member-<i>.ckpt) and,
    with evaluate.rerank_neighbours, the training images' features and captions (`neighbours`: neighbours.npz)."""
    e = p.evaluate
    module = load_module("captioner", checkpoint)
    captioner_ensemble(module, e.captioner_ensemble, checkpoint)  # every member checked now, not when served
    files = {f"member-{i}": folder / f"member-{i}.ckpt" for i in range(1, len(e.captioner_ensemble) + 1)}
    for member, copy in zip(e.captioner_ensemble, files.values(), strict=True):
        shutil.copyfile(member, copy)
    if e.rerank_neighbours > 0:
        files["neighbours"] = folder / "neighbours.npz"
        save_neighbours(caption_neighbours(p, module, e.rerank_neighbours), files["neighbours"])
    return files
