"""`python -m bench.prepare_hash_cost [RUNS]`: what checking and hashing every image costs `prepare_coco`.

On ../shared/data/coco-sample (179 COCO images), S=64, 2 workers: images/s of the decode pass alone against
check (regular file inside the folder, size cap) + sha256 + decode, medians over RUNS runs (default 5).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from pipeline.data.coco import prepare_coco

# not bench.common: it imports torch, which every spawned decode worker would then import too (as the real
# stage's workers do not), and the pool's start-up is inside the timed decode
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def one_run(root: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return prepare_coco(f"{tmp}/out", f"{root}/annotations/captions.json", f"{root}/images",
                            val_annotations=None, val_images=None, image_size=64, val=20, test=20, seed=0,
                            max_skipped_fraction=0.5, workers=2, chunk_size=64, max_caption_tokens=50,
                            max_image_bytes=64 << 20, max_image_pixels=40_000_000)


def main() -> None:
    root = SHARED_DATA / "coco-sample"
    if not root.is_dir():
        sys.exit(f"{root}: not found (the shared COCO sample)")
    runs = [one_run(str(root)) for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5)]
    images = sum(runs[0]["splits"].values())
    decode = statistics.median(images / r["seconds"] for r in runs)
    both = statistics.median(images / (r["seconds"] + r["check_seconds"]) for r in runs)
    check_ms = statistics.median(r["check_seconds"] for r in runs) * 1000
    print(f"prepare_coco on {images} images: decode only {decode:.0f} images/s, check + sha256 + decode "
          f"{both:.0f} images/s ({both / decode:.2f}x); the check pass {check_ms:.0f} ms")


if __name__ == "__main__":
    main()
