"""The baseline every captioner evaluation reports: copy the caption of the nearest training image.

A captioner that does not beat this has learnt retrieval at best. Nearest = cosine similarity of the
captioner's own CNN encoder features, averaged over regions; of the neighbour's captions the one with the
highest CIDEr against its other captions (the consensus caption, Devlin et al. 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.metrics import caption_scores, consensus_captions

PREFIX = "nn_"  # nn_cider, nn_bleu_4, ...: next to the model's cider, bleu_4, ...


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: DataLoader, device: torch.device) -> tuple[list[int], Tensor]:
    """image_index of every item and its L2-normalised encoder features averaged over regions (N, C)."""
    was_training = encoder.training
    encoder.eval()
    keys, rows = [], []
    try:
        for batch in loader:
            maps = encoder(batch["images"].to(device))  # (B, C, h, w)
            rows.append(F.normalize(maps.float().mean(dim=(2, 3)), dim=1).cpu())  # (B, C)
            keys.extend(batch["image_index"].tolist())
    finally:
        encoder.train(was_training)
    return keys, torch.cat(rows)


def nearest_images(train: tuple[list[int], Tensor], queries: tuple[list[int], Tensor], k: int) -> dict[int, list[int]]:
    """For each query image, the keys of its k most similar training images (cosine), most similar first."""
    train_keys, train_feats = train
    query_keys, query_feats = queries
    k = min(k, len(train_keys))
    nearest = (query_feats @ train_feats.T).topk(k, dim=1).indices.tolist()  # (Q, T) cosine -> (Q, k)
    return {q: [train_keys[i] for i in row] for q, row in zip(query_keys, nearest, strict=True)}


def nearest_neighbour_captions(train: tuple[list[int], Tensor], queries: tuple[list[int], Tensor],
                               train_refs: dict[int, list[str]]) -> dict[int, str]:
    """For each query image, the consensus caption of the training image most similar to it."""
    consensus = consensus_captions(train_refs)
    return {q: consensus[nearest[0]] for q, nearest in nearest_images(train, queries, 1).items()}


def nearest_neighbour_scores(train: tuple[list[int], Tensor], queries: tuple[list[int], Tensor],
                             train_refs: dict[int, list[str]], eval_refs: dict[int, list[str]], meteor: bool) -> dict:
    """coco-caption scores of the nearest-neighbour captions (pooled features of both splits), keyed nn_<metric>."""
    hyps = nearest_neighbour_captions(train, queries, train_refs)
    scores = caption_scores({k: eval_refs[k] for k in hyps}, hyps, meteor=meteor)
    return {f"{PREFIX}{k}": v for k, v in scores.items()}
