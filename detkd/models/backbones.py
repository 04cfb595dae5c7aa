"""Randomly initialised backbone + FPN builders (no weight downloads)."""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
BACKBONES = (*RESNETS, "mobilenet_v3")
EXTRA_LEVELS = {"p6p7": 2, "pool": 1}  # FPN levels each extra block adds above the last stage


def build_fpn_backbone(
    name: str,
    *,
    fpn_channels: int,
    extra: str,
    returned_layers: list[int],
) -> BackboneWithFPN:
    """Backbone + FPN with trainable BatchNorm (training from scratch needs real BN statistics).

    ``extra`` is "p6p7" (RetinaNet/FCOS: P6/P7 convs on P5) or "pool" (Faster R-CNN: P6 max-pool).
    ``returned_layers`` are the ResNet stages (1..4) fed to the FPN; for MobileNetV3 they are
    mapped to the stages of strides 4, 8, 16, 32.
    """
    if name in RESNETS:
        body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
        # torchvision's _resnet_fpn_extractor fixes 256 FPN channels; small FPNs need our own.
        stage2 = body.inplanes // 8
        return BackboneWithFPN(
            body,
            return_layers={f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
            in_channels_list=[stage2 * 2 ** (k - 1) for k in returned_layers],
            out_channels=fpn_channels,
            extra_blocks=_extra_block(extra, fpn_channels),
        )
    if name == "mobilenet_v3":
        return _mobilenet_fpn(fpn_channels=fpn_channels, extra=extra, returned_layers=returned_layers)
    raise KeyError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")


def _extra_block(extra: str, fpn_channels: int) -> ExtraFPNBlock:
    if extra == "p6p7":
        return LastLevelP6P7(fpn_channels, fpn_channels)
    if extra == "pool":
        return LastLevelMaxPool()
    raise ValueError(f"unknown FPN extra block {extra!r}; available: {', '.join(EXTRA_LEVELS)}")


def _mobilenet_fpn(*, fpn_channels: int, extra: str, returned_layers: list[int]) -> BackboneWithFPN:
    features = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
    # Stages end before each stride-2 block; stage k (1..4) has stride 2**(k+1) like ResNet layer k.
    down = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    ends = [*down[1:], len(features)]  # last index (exclusive) of strides 4, 8, 16, 32
    return_layers = {str(ends[k - 1] - 1): str(i) for i, k in enumerate(returned_layers)}
    in_channels = [_out_channels(features[ends[k - 1] - 1]) for k in returned_layers]
    return BackboneWithFPN(
        features,
        return_layers=return_layers,
        in_channels_list=in_channels,
        out_channels=fpn_channels,
        extra_blocks=_extra_block(extra, fpn_channels),
    )


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return block.out_channels
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels
