"""Frozen-encoder features of every prepared split, so captioner training and sweeps skip the CNN.

DVC stage `features`: params `features`, `models.captioner.{encoder,encoder_weights,freeze_encoder,finetune_blocks}`,
`prepare_coco.image_size`; {paths.coco}/<split>/images.npy
-> {paths.features}/<split>.npy (float16/32 (N, C, h, w)) + manifest.json, {paths.metrics}/features.json.
With features.enabled false it writes only manifest.json saying so (no torch import), so the DAG is the same
either way and the captioner's sweep and training depend on a stable output.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data import SPLITS
from pipeline.io import atomic_dir, write_json, write_metrics
from pipeline.params import Params, load_params
from pipeline.runtime import set_threads
from stages import entry


def extract_splits(p: Params, out_dir: Path) -> dict:
    """Run the captioner's frozen encoder over every split into out_dir; the metrics."""
    import torch

    from pipeline.models.encoders import build_encoder
    from pipeline.training.datasets import LazyArray
    from pipeline.training.features import extract_features, write_manifest

    c = p.models.captioner
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = build_encoder(c.encoder, c.encoder_weights, c.freeze_encoder, c.finetune_blocks).to(device)
    done = {s: extract_features(encoder, LazyArray(Path(p.paths.coco) / s / "images.npy"), p.features.batch_size,
                                out_dir / f"{s}.npy", p.features.dtype) for s in SPLITS}
    manifest = write_manifest(out_dir, c, p.paths.coco, p.features.dtype, done)
    seconds = sum(d["seconds"] for d in done.values())
    images = sum(d["rows"] for d in done.values())
    return {"enabled": True, "encoder": c.encoder, "device": device.type, "dtype": p.features.dtype,
            "feature_shape": manifest["feature_shape"], "splits": {s: d["rows"] for s, d in done.items()},
            "bytes": sum(d["bytes"] for d in done.values()), "seconds": round(seconds, 3),
            "images_per_second": round(images / max(seconds, 1e-9), 2)}


def run(p: Params) -> dict:
    """Write {paths.features} whole (atomically: a failed run keeps the previous folder) and the metrics."""
    out = Path(p.paths.features)
    with atomic_dir(out) as tmp:
        if p.features.enabled:
            set_threads(p.runtime.threads)  # here only: a disabled stage never imports torch
            metrics = extract_splits(p, tmp)
        else:
            write_json(tmp / "manifest.json", {"enabled": False})
            metrics = {"enabled": False}
    write_metrics(Path(p.paths.metrics) / "features.json", metrics)
    if metrics["enabled"]:
        print(f"features: {metrics['encoder']} {'x'.join(map(str, metrics['feature_shape']))} {metrics['dtype']}, "
              f"{sum(metrics['splits'].values()):,} images at {metrics['images_per_second']:,.0f}/s -> {out}")
    else:
        print(f"features: disabled (features.enabled: false); wrote {out}/manifest.json only")
    return metrics


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
