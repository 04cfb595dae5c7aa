"""Backbone + FPN builders, randomly initialised (no weight downloads; ``detkd.models.pretrained``
loads a local file into the trunk afterwards)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import mobilenet_v2, mobilenet_v3_large, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
MOBILENETS: dict[str, Callable[..., nn.Module]] = {"mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3_large}
BACKBONES = (*RESNETS, *MOBILENETS)
EXTRA_LEVELS = {"p6p7": 2, "pool": 1}  # FPN levels each extra block adds above the last stage
# Trunk stages ``trainable_layers`` counts, torchvision's way: ResNet layer4..layer1 + the stem;
# MobileNet the blocks from each stride-2 block on, the stem and the last block.
RESNET_STAGES = 5
MOBILENET_STAGES = 6


def max_trainable_layers(name: str) -> int:
    """The largest ``trainable_layers`` of a backbone (every stage trains)."""
    if name in RESNETS:
        return RESNET_STAGES
    if name in MOBILENETS:
        return MOBILENET_STAGES
    raise KeyError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")


def build_fpn_backbone(
    name: str,
    *,
    fpn_channels: int,
    extra: str,
    returned_layers: list[int],
    trainable_layers: int | None = None,
) -> BackboneWithFPN:
    """Backbone + FPN.

    ``extra`` is "p6p7" (RetinaNet/FCOS: P6/P7 convs on P5) or "pool" (Faster R-CNN: P6 max-pool).
    ``returned_layers`` are the ResNet stages (1..4) fed to the FPN; for MobileNets they are
    mapped to the stages of strides 4, 8, 16, 32.
    ``trainable_layers``: None (from scratch) trains every stage with BatchNorm2d (training from
    scratch needs real BN statistics). k trains only the top k stages, torchvision's count
    (``max_trainable_layers``); the stages below get no gradients and FrozenBatchNorm2d, so their
    pretrained statistics stay as they are.
    """
    if trainable_layers is not None and not 0 <= trainable_layers <= max_trainable_layers(name):
        raise ValueError(f"trainable_layers={trainable_layers} for {name}: 0..{max_trainable_layers(name)}")
    if name in RESNETS:
        body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
        if trainable_layers is not None:
            # torchvision's _resnet_fpn_extractor: the stages from the top, the stem (conv1 + bn1) last.
            stages = [["layer4"], ["layer3"], ["layer2"], ["layer1"], ["conv1", "bn1"]]
            for stage in stages[trainable_layers:]:
                for child in stage:
                    setattr(body, child, freeze(getattr(body, child)))
        # torchvision's _resnet_fpn_extractor fixes 256 FPN channels; small FPNs need our own.
        stage2 = body.inplanes // 8
        return BackboneWithFPN(
            body,
            return_layers={f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
            in_channels_list=[stage2 * 2 ** (k - 1) for k in returned_layers],
            out_channels=fpn_channels,
            extra_blocks=_extra_block(extra, fpn_channels),
        )
    if name in MOBILENETS:
        return _mobilenet_fpn(
            MOBILENETS[name],
            fpn_channels=fpn_channels,
            extra=extra,
            returned_layers=returned_layers,
            trainable_layers=trainable_layers,
        )
    raise KeyError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")


def freeze(module: nn.Module) -> nn.Module:
    """``module`` without gradients, each BatchNorm2d in it (or itself) a FrozenBatchNorm2d holding the
    same statistics; use the module returned (a BatchNorm2d is replaced, not changed).

    A frozen stage with plain BatchNorm would still move its running statistics in train mode.
    FrozenBatchNorm2d has the same state-dict keys less ``num_batches_tracked``.
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, key).copy_(getattr(module, key).detach())
        return frozen
    for child_name, child in module.named_children():
        setattr(module, child_name, freeze(child))
    return module.requires_grad_(False)


def _extra_block(extra: str, fpn_channels: int) -> ExtraFPNBlock:
    if extra == "p6p7":
        return LastLevelP6P7(fpn_channels, fpn_channels)
    if extra == "pool":
        return LastLevelMaxPool()
    raise ValueError(f"unknown FPN extra block {extra!r}; available: {', '.join(EXTRA_LEVELS)}")


def _mobilenet_fpn(
    make: Callable[..., nn.Module],
    *,
    fpn_channels: int,
    extra: str,
    returned_layers: list[int],
    trainable_layers: int | None,
) -> BackboneWithFPN:
    """torchvision's ``mobilenet_backbone``, with one difference: it feeds the FPN two stride-32
    maps, detkd the last block of each of strides 4, 8, 16, 32 (the levels every family expects)."""
    features = make(weights=None, norm_layer=nn.BatchNorm2d).features
    # Stages end before each stride-2 block; stage k (1..4) has stride 2**(k+1) like ResNet layer k.
    down = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    ends = [*down[1:], len(features)]  # last index (exclusive) of strides 4, 8, 16, 32
    if trainable_layers is not None:
        # torchvision's: the stem, each stride-2 block and the last block start the stages it counts.
        starts = [0, *down, len(features) - 1]
        freeze_before = len(features) if trainable_layers == 0 else starts[len(starts) - trainable_layers]
        for i in range(freeze_before):
            features[i] = freeze(features[i])
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
