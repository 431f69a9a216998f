"""The packaged EfficientNet-Lite0 weights classify real COCO photos: proof the weight mapping is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from pipeline.models.encoders import build_encoder, efficientnet_weights_file

pytestmark = pytest.mark.shared_data

# COCO sample image -> ImageNet class its five human captions clearly name (checked in the JSON).
EXPECTED = {
    "000000019221.jpg": (937, "broccoli"),  # "broccoli" in all 5 captions
    "000000011813.jpg": (872, "tripod"),  # a camera on a tripod (4 of 5)
    "000000113354.jpg": (340, "zebra"),  # zebras (5 of 5)
}


def centre_crop(path, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """ImageNet evaluation geometry: shorter side -> 256, centre 224 crop; uint8 (3, 224, 224)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resize / min(w, h)
        im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        w, h = im.size
        left, top = (w - crop) // 2, (h - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def test_efficientnet_lite0_classifies_coco_photos(shared_data):
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet-1k class names, in order
    for index, name in EXPECTED.values():
        assert categories[index] == name
    encoder = build_encoder("efficientnet_lite0", None, freeze=True, finetune_blocks=0).eval()
    head = torch.load(efficientnet_weights_file(), map_location="cpu", weights_only=True)
    images = torch.stack([centre_crop(shared_data / "coco-sample" / "images" / f) for f in EXPECTED])
    with torch.no_grad():
        features = encoder(images)  # (3, 1280, 7, 7)
        logits = features.mean(dim=(2, 3)) @ head["_fc.weight"].T + head["_fc.bias"]  # (3, 1000)
    assert features.shape == (3, 1280, 7, 7)
    top5 = logits.topk(5, dim=-1).indices
    for row, (file_name, (index, name)) in enumerate(EXPECTED.items()):
        got = [categories[i] for i in top5[row].tolist()]
        assert index in top5[row].tolist(), f"{file_name}: expected {name!r} in the top 5, got {got}"
