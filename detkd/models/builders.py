"""Build a detector from its spec; the family registration (``detkd.models.families``) does the work.

Random initialisation, then the trunk from ``spec.backbone_weights`` if given (a local file;
``detkd.models.pretrained``): nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from torch import nn

from detkd.models.backbones import BACKBONES
from detkd.models.defaults import DEFAULTS, TORCHVISION_SIZES
from detkd.models.detector import Detector
from detkd.models.families import DETECTORS, DetectorFamily, all_assigners
from detkd.models.pretrained import load_backbone_weights

__all__ = ["DETECTORS", "DetectorFamily", "DetectorSpec", "build_detector", "torchvision_spec"]


@dataclass
class DetectorSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint (all fields, explicitly).

    Defaults are the recipe's (``detkd.models.defaults``, one table for both).
    ``num_classes`` counts object classes K (labels 1..K); torchvision models get K + 1.
    ``anchor_size`` is the anchor (or FCOS size-range base) of the finest level; smaller
    than torchvision's default suits small images; None takes the family's default. RetinaNet
    tiles ``anchor_scales`` octave scales x ``anchor_ratios`` aspect ratios per cell
    (torchvision: 3 x (0.5, 1, 2) = 9). ``head_convs`` is the depth of the dense heads' conv
    towers (torchvision uses 4). ``assigner`` picks how RetinaNet labels anchors: "iou"
    (torchvision's matcher: IoU >= 0.5 positive, < 0.4 negative) or "atss" (per-object adaptive
    IoU threshold, see ``detkd.models.assigners``); each family's registration lists the ones it takes.
    ``backbone_weights`` is a local file the trunk starts from (torchvision classification weights or
    a detection checkpoint's ``backbone.body``); the build records its ``backbone_weights_sha256``.
    ``trainable_layers`` counts the trunk stages that train, from the top (torchvision's count; with
    weights only; None: 3 with weights, all without); frozen stages get FrozenBatchNorm2d.
    """

    # Pickled by old checkpoints as detkd.models.builders.DetectorSpec: it must stay in this module.
    family: str = DEFAULTS.family
    backbone: str = DEFAULTS.backbone
    num_classes: int = DEFAULTS.num_classes
    fpn_channels: int = DEFAULTS.fpn_channels
    head_convs: int = DEFAULTS.head_convs
    anchor_size: int | None = DEFAULTS.anchor_size
    anchor_scales: int = DEFAULTS.anchor_scales
    anchor_ratios: list[float] = field(default_factory=lambda: list(DEFAULTS.anchor_ratios))
    assigner: str = DEFAULTS.assigner
    box_head_dim: int = DEFAULTS.box_head_dim
    score_thresh: float = DEFAULTS.score_thresh
    nms_thresh: float = DEFAULTS.nms_thresh
    detections_per_img: int = DEFAULTS.detections_per_img
    image_mean: list[float] = field(default_factory=lambda: list(DEFAULTS.image_mean))
    image_std: list[float] = field(default_factory=lambda: list(DEFAULTS.image_std))
    backbone_weights: str | None = DEFAULTS.backbone_weights
    backbone_weights_sha256: str | None = DEFAULTS.backbone_weights_sha256
    trainable_layers: int | None = DEFAULTS.trainable_layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown detector spec keys: {sorted(unknown)}")
        return cls(**d)


def torchvision_spec(d: dict) -> DetectorSpec:
    """The spec of a plain torchvision state dict given as a (partial) dict: sizes it leaves out are
    torchvision's own (``TORCHVISION_SIZES``), as they always were for such a dict."""
    return DetectorSpec.from_dict({**TORCHVISION_SIZES, **d})


def build_detector(spec: DetectorSpec | dict, *, read_backbone_weights: bool = True) -> Detector:
    """The detector ``spec`` describes; its trunk from ``spec.backbone_weights`` when given.

    ``read_backbone_weights=False`` builds the architecture only (frozen stages included): for a
    checkpoint's weights, which replace the trunk's, the file need not be there.
    """
    if isinstance(spec, dict):
        spec = DetectorSpec.from_dict(spec)
    if spec.backbone not in BACKBONES:
        raise KeyError(f"unknown backbone {spec.backbone!r}; available: {', '.join(BACKBONES)}")
    family = DETECTORS.get(spec.family)
    _check_assigner(spec, family)
    model = family.build(spec)
    if spec.backbone_weights is not None and read_backbone_weights:
        sha256 = load_backbone_weights(
            _trunk(model, spec),
            spec.backbone_weights,
            backbone=spec.backbone,
            expected_sha256=spec.backbone_weights_sha256,
        )
        spec = replace(spec, backbone_weights_sha256=sha256)  # the checkpoint says what the run started from
    return Detector(model, spec=spec.to_dict(), image_mean=spec.image_mean, image_std=spec.image_std)


def _trunk(model: nn.Module, spec: DetectorSpec) -> nn.Module:
    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None:
        raise ValueError(f"backbone_weights: the {spec.family} family's model has no backbone.body to load them into")
    return body


def _check_assigner(spec: DetectorSpec, family: DetectorFamily) -> None:
    known = all_assigners()
    if spec.assigner not in known:
        raise ValueError(f"unknown assigner {spec.assigner!r}; available: {', '.join(known)}")
    if spec.assigner not in family.assigners:
        takers = [name for name, f in DETECTORS.items() if spec.assigner in f.assigners]
        raise ValueError(f"assigner {spec.assigner!r} applies to {', '.join(takers)} only; {spec.family} has its own")
