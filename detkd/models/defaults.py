"""The one table of model-spec defaults: ``DetectorSpec`` and the recipe's ``model`` section read it.

These are the recipe's defaults (a narrow FPN and shallow heads, for small images): every recipe
and run has used them, so runs stay what they were. Checkpoints store every field explicitly and
never read these. Import-light on purpose (no torch): ``detkd.config`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SpecDefaults:
    family: str = "fcos"
    backbone: str = "resnet18"
    num_classes: int = 1
    fpn_channels: int = 64
    head_convs: int = 2
    anchor_size: int | None = None  # None: the family's own default (its registration says which)
    anchor_scales: int = 3
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    assigner: str = "iou"
    box_head_dim: int = 256
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet statistics
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    backbone_weights: str | None = None  # None: a randomly initialised trunk (from scratch)
    backbone_weights_sha256: str | None = None  # recorded by the build, not a recipe key
    trainable_layers: int | None = None  # None: all from scratch, torchvision's 3 with backbone_weights


DEFAULTS = SpecDefaults()

# The sizes of torchvision's own detectors (FPN 256, 4-conv heads, 1024-d box head): what a plain
# torchvision state dict most likely holds. Used only for a spec given as a partial dict next to
# such a file (``load_detector(path, spec={...})``, e.g. the recipe's ``distill.teacher_model``),
# where they were the defaults before this table existed.
TORCHVISION_SIZES: dict[str, int] = {"fpn_channels": 256, "head_convs": 4, "box_head_dim": 1024}


class ModelSpec(Protocol):
    """What a detector family reads of a spec (``DetectorSpec`` has these fields): lets the families
    type their ``spec`` without importing the builders that import them."""

    family: str
    backbone: str
    num_classes: int
    fpn_channels: int
    head_convs: int
    anchor_size: int | None
    anchor_scales: int
    anchor_ratios: list[float]
    assigner: str
    box_head_dim: int
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    backbone_weights: str | None
    backbone_weights_sha256: str | None
    trainable_layers: int | None
