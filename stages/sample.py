"""Generate the embedded shapes captioning set (COCO captions JSON + real JPEGs).

DVC stage `sample`: params `seed`, `sample` -> {paths.sample}, metrics/sample.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.sample import generate_sample
from pipeline.io import write_metrics
from pipeline.params import Params, load_params
from stages import entry


def run(p: Params) -> dict[str, Any]:
    """Generate the set under paths.sample and write metrics/sample.json; return the metrics."""
    s = p.sample
    stats = generate_sample(Path(p.paths.sample), seed=p.seed, images=s.images, image_size=s.image_size,
                            jpeg_quality=s.jpeg_quality, min_shapes=s.min_shapes, max_shapes=s.max_shapes)
    write_metrics(Path(p.paths.metrics) / "sample.json", stats)
    print(f"sample: {stats['images']:,} images, {stats['captions']:,} captions, "
          f"{stats['shapes']:,} shapes, {stats['words']} words -> {p.paths.sample}")
    return stats


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
