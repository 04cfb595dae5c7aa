"""What a detector family is: one registered object holding everything family-specific.

detkd bypasses torchvision's transform and ``forward`` (see ``detkd.models.detector``), so a
family says how to build its torchvision model *and* how to run that model's heads on detkd's
FPN features. Everything else (the Detector wrapper, checkpoints, export, distillation) asks
the family instead of testing which one it has.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar, TypeVar

from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList

from detkd.models.backbones import EXTRA_LEVELS, build_fpn_backbone
from detkd.models.defaults import ModelSpec
from detkd.models.pretrained import trainable_layers
from detkd.registry import Registry

Targets = list[dict[str, Tensor]]
Features = OrderedDict[str, Tensor]  # torchvision-keyed FPN features ("0", "1", ...), finest first


class DetectorFamily:
    """One detector family. Subclass it, set the class attributes, implement ``build``,
    ``losses`` and ``predict`` (dense one-stage detectors: subclass ``DenseFamily``), and
    register it with ``@register_family("name")``.
    """

    name: ClassVar[str] = ""  # set by register_family
    model_types: ClassVar[tuple[type[nn.Module], ...]]  # the torchvision classes ``build`` returns
    default_anchor_size: ClassVar[int]  # finest level's anchor (FCOS: size-range base) when the spec has none
    fpn_extra: ClassVar[str] = "p6p7"  # extra FPN block: "p6p7" (P6/P7 convs) or "pool" (P6 max-pool)
    returned_layers: ClassVar[tuple[int, ...]] = (2, 3, 4)  # backbone stages (1..4) fed to the FPN
    assigners: ClassVar[tuple[str, ...]] = ("iou",)  # anchor labellings (spec.assigner) the family accepts

    def build(self, spec: ModelSpec) -> nn.Module:
        """The torchvision model, randomly initialised (``spec.num_classes`` + background); the trunk's
        frozen stages as the spec says (``backbone``). The build loads ``spec.backbone_weights`` afterwards."""
        raise NotImplementedError

    def losses(
        self, model: nn.Module, features: Features, image_list: ImageList, targets: Targets
    ) -> dict[str, Tensor]:
        """Detection losses from torchvision-keyed features, as torchvision's train-mode forward gives them."""
        raise NotImplementedError

    def predict(self, model: nn.Module, features: Features, image_list: ImageList) -> list[dict[str, Tensor]]:
        """Post-NMS detections (boxes xyxy in canvas pixels, scores, labels)."""
        raise NotImplementedError

    # -- defaults a family may keep ------------------------------------------------------------------
    def backbone(self, spec: ModelSpec) -> BackboneWithFPN:
        return build_fpn_backbone(
            spec.backbone,
            fpn_channels=spec.fpn_channels,
            extra=self.fpn_extra,
            returned_layers=list(self.returned_layers),
            trainable_layers=trainable_layers(spec),
        )

    def anchor_size(self, spec: ModelSpec) -> int:
        return spec.anchor_size or self.default_anchor_size

    def levels(self) -> list[str]:
        """Feature level names (``p{log2 stride}``), finest first, without building a model.

        Stage k of the backbone has stride 2**(k+1); the extra block adds coarser levels. A family
        that overrides ``backbone`` must override this too (tests check it against a built model).
        """
        stages = [k + 1 for k in self.returned_layers]
        extra = [stages[-1] + i for i in range(1, EXTRA_LEVELS[self.fpn_extra] + 1)]
        return [f"p{k}" for k in (*stages, *extra)]

    def train_mode_heads(self, model: nn.Module) -> list[nn.Module]:
        """Submodules that compute losses only in training mode (Faster R-CNN's RPN and RoI heads).

        They hold no BatchNorm or dropout, so putting them in train mode to get a loss from an
        eval-mode model (gradient-guided KD on a teacher) changes nothing else.
        """
        return []

    def deployable(self, model: nn.Module) -> nn.Module:
        """``model`` (a copy, free to modify) as torchvision's own class, for export."""
        return model


F = TypeVar("F", bound=type[DetectorFamily])

DETECTORS: Registry[DetectorFamily] = Registry("detector family")


def register_family(name: str) -> Callable[[F], F]:
    """Class decorator: ``@register_family("fcos")`` registers one instance; sets ``cls.name``."""

    def decorator(cls: F) -> F:
        DETECTORS.register(name)(cls())
        cls.name = name  # after registering: a refused duplicate leaves the class as it was
        return cls

    return decorator


def all_assigners() -> list[str]:
    """Every anchor labelling some registered family accepts (what a recipe may name)."""
    return sorted({a for _, family in DETECTORS.items() for a in family.assigners})


class DenseFamily(DetectorFamily):
    """One-stage detectors with torchvision's dense-head interface (``head``, ``anchor_generator``,
    ``compute_loss``, ``postprocess_detections``): RetinaNet, FCOS."""

    def losses(
        self, model: nn.Module, features: Features, image_list: ImageList, targets: Targets
    ) -> dict[str, Tensor]:
        feats = list(features.values())
        head_outputs = model.head(feats)
        anchors = model.anchor_generator(image_list, feats)
        return self.compute_loss(model, targets, head_outputs, anchors, feats)

    def compute_loss(
        self,
        model: nn.Module,
        targets: Targets,
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        feats: list[Tensor],
    ) -> dict[str, Tensor]:
        """torchvision's loss call; a family whose ``compute_loss`` takes more arguments overrides this."""
        return model.compute_loss(targets, head_outputs, anchors)

    def predict(self, model: nn.Module, features: Features, image_list: ImageList) -> list[dict[str, Tensor]]:
        feats = list(features.values())
        # Decode and score in float32: under float16 autocast torchvision decodes boxes in the head's
        # dtype, which spaces coordinates 0.5 px apart from 512 px up (1 px from 1024).
        head_outputs = {k: v.float() for k, v in model.head(feats).items()}
        anchors = model.anchor_generator(image_list, feats)
        num_per_level = [x.size(2) * x.size(3) for x in feats]
        hwa = head_outputs["cls_logits"].size(1)
        a = hwa // sum(num_per_level)
        split = [n * a for n in num_per_level]
        split_outputs = {k: list(v.split(split, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(x.split(split)) for x in anchors]
        return model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)


# -- head parts shared by the built-in dense families ------------------------------------------------
def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm that also fits narrow FPNs (torchvision's GroupNorm(32, C) needs C >= 32)."""
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


def conv_tower(channels: int, depth: int) -> nn.Sequential:
    """Conv-GN-ReLU tower initialised like torchvision's FCOS head (normal std 0.01, zero bias)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, 0)
        layers += [conv, group_norm(channels), nn.ReLU()]
    return nn.Sequential(*layers)
