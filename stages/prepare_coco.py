"""Validate the COCO captions, split by image, resize every image once into uint8 arrays.

DVC stage `prepare_coco`: params `seed`, `data.coco`, `prepare_coco`
-> {paths.coco}/{train,val,test}/{images.npy,captions.jsonl}, {paths.coco}/manifest.json,
metrics/prepare_coco.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.coco import prepare_coco
from pipeline.io import remove_stale_temporaries, write_metrics
from pipeline.params import Params, load_params
from stages import entry


def run(p: Params) -> dict[str, Any]:
    """Prepare paths.coco from data.coco and write metrics/prepare_coco.json; return the metrics."""
    src, c = p.data.coco, p.prepare_coco
    stats = prepare_coco(
        p.paths.coco, src.annotations, src.images,
        val_annotations=src.val_annotations, val_images=src.val_images,
        image_size=c.image_size, val=c.split.val, test=c.split.test, seed=p.seed,
        max_skipped_fraction=c.max_skipped_fraction, workers=c.workers, chunk_size=c.chunk_size,
        max_caption_tokens=c.max_caption_tokens, max_image_bytes=c.max_image_bytes,
        max_image_pixels=c.max_image_pixels,
    )
    metrics = Path(p.paths.metrics) / "prepare_coco.json"
    remove_stale_temporaries(metrics)  # a write_json temporary left by a killed run
    write_metrics(metrics, stats)
    sp = stats["splits"]
    print(f"prepare_coco: {stats['images']:,} images (train {sp['train']:,} / val {sp['val']:,} / "
          f"test {sp['test']:,}), {stats['captions']:,} captions, {stats['skipped_images']:,} images and "
          f"{stats['skipped_captions']:,} captions skipped, {stats['images_per_second']:,.0f} images/s "
          f"with {stats['workers']} workers -> {p.paths.coco}")
    return stats


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
