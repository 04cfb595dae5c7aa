"""Detector registry: one builder per family over torchvision's detectors, random init only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from detkd.models.assigners import ATSSRetinaNet
from detkd.models.backbones import BACKBONES, build_fpn_backbone
from detkd.models.detector import Detector
from detkd.registry import Registry

DETECTORS: Registry[Callable[..., Detector]] = Registry("detector family")

ASSIGNERS = ("iou", "atss")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DetectorSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint.

    ``num_classes`` counts object classes K (labels 1..K); torchvision models get K + 1.
    ``anchor_size`` is the anchor (or FCOS size-range base) of the finest level; smaller
    than torchvision's default suits small images. RetinaNet tiles ``anchor_scales`` octave
    scales x ``anchor_ratios`` aspect ratios per cell (torchvision: 3 x (0.5, 1, 2) = 9).
    ``head_convs`` is the depth of the dense heads' conv towers (torchvision uses 4).
    ``assigner`` picks how RetinaNet labels anchors: "iou" (torchvision's matcher: IoU >= 0.5
    positive, < 0.4 negative) or "atss" (per-object adaptive IoU threshold, see
    ``detkd.models.assigners``).
    """

    family: str = "fcos"
    backbone: str = "resnet18"
    num_classes: int = 1
    fpn_channels: int = 256
    head_convs: int = 4
    anchor_size: int | None = None
    anchor_scales: int = 3
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    assigner: str = "iou"
    box_head_dim: int = 1024
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown detector spec keys: {sorted(unknown)}")
        return cls(**d)


def build_detector(spec: DetectorSpec | dict) -> Detector:
    if isinstance(spec, dict):
        spec = DetectorSpec.from_dict(spec)
    if spec.backbone not in BACKBONES:
        raise KeyError(f"unknown backbone {spec.backbone!r}; available: {', '.join(BACKBONES)}")
    if spec.assigner not in ASSIGNERS:
        raise ValueError(f"unknown assigner {spec.assigner!r}; available: {', '.join(ASSIGNERS)}")
    if spec.assigner != "iou" and spec.family != "retinanet":
        raise ValueError(f"assigner {spec.assigner!r} applies to retinanet only; {spec.family} has its own")
    model = DETECTORS.get(spec.family)(spec)
    return Detector(model, spec=spec.to_dict(), image_mean=spec.image_mean, image_std=spec.image_std)


def _dense_anchor_sizes(base: int, scales: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(base * 2**level * s) for s in scales) for level in range(5))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


def _conv_tower(channels: int, depth: int) -> nn.Sequential:
    """Conv-GN-ReLU tower initialised like torchvision's FCOS head (normal std 0.01, zero bias)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, 0)
        layers += [conv, _group_norm(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def _set_tower_depth(tower: nn.Sequential, depth: int) -> nn.Sequential:
    """Keep the first ``depth`` (conv, norm, relu) triples of a torchvision head tower."""
    per_block = len(tower) // 4
    return nn.Sequential(*list(tower.children())[: depth * per_block])


@DETECTORS.register("retinanet")
def _retinanet(spec: DetectorSpec) -> RetinaNet:
    backbone = build_fpn_backbone(
        spec.backbone, fpn_channels=spec.fpn_channels, extra="p6p7", returned_layers=[2, 3, 4]
    )
    base = spec.anchor_size or 32
    scales = tuple(2 ** (i / spec.anchor_scales) for i in range(spec.anchor_scales))
    anchors = AnchorGenerator(_dense_anchor_sizes(base, scales), (tuple(spec.anchor_ratios),) * 5)
    # GroupNorm in the head (torchvision's RetinaNet v2 choice): stable from scratch at small batch.
    head = RetinaNetHead(
        spec.fpn_channels,
        anchors.num_anchors_per_location()[0],
        spec.num_classes + 1,
        norm_layer=_group_norm,
    )
    head.classification_head.conv = _set_tower_depth(head.classification_head.conv, spec.head_convs)
    head.regression_head.conv = _set_tower_depth(head.regression_head.conv, spec.head_convs)
    # GIoU box loss, as torchvision's RetinaNet v2 recipe sets it (the v1 default is L1 on deltas).
    head.regression_head._loss_type = "giou"
    detector_class = ATSSRetinaNet if spec.assigner == "atss" else RetinaNet
    return detector_class(
        backbone,
        spec.num_classes + 1,
        anchor_generator=anchors,
        head=head,
        score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
    )


@DETECTORS.register("fcos")
def _fcos(spec: DetectorSpec) -> FCOS:
    backbone = build_fpn_backbone(
        spec.backbone, fpn_channels=spec.fpn_channels, extra="p6p7", returned_layers=[2, 3, 4]
    )
    base = spec.anchor_size or 8
    anchors = AnchorGenerator(tuple((base * 2**i,) for i in range(5)), ((1.0,),) * 5)
    # torchvision's FCOS towers use GroupNorm(32, C), impossible for narrow FPNs: build them here.
    head = FCOSHead(spec.fpn_channels, 1, spec.num_classes + 1, num_convs=0)
    head.classification_head.conv = _conv_tower(spec.fpn_channels, spec.head_convs)
    head.regression_head.conv = _conv_tower(spec.fpn_channels, spec.head_convs)
    return FCOS(
        backbone,
        spec.num_classes + 1,
        anchor_generator=anchors,
        head=head,
        score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
    )


@DETECTORS.register("fasterrcnn")
def _faster_rcnn(spec: DetectorSpec) -> FasterRCNN:
    backbone = build_fpn_backbone(
        spec.backbone, fpn_channels=spec.fpn_channels, extra="pool", returned_layers=[1, 2, 3, 4]
    )
    base = spec.anchor_size or 32
    anchors = AnchorGenerator(tuple((base * 2**i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, spec.box_head_dim)
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(spec.box_head_dim, spec.num_classes + 1),
        box_score_thresh=spec.score_thresh,
        box_nms_thresh=spec.nms_thresh,
        box_detections_per_img=spec.detections_per_img,
    )
