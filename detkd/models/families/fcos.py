"""FCOS: torchvision's, with GroupNorm towers of any depth and width (narrow FPNs included)."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from detkd.models.defaults import ModelSpec
from detkd.models.families.base import DenseFamily, Targets, conv_tower, register_family


@register_family("fcos")
class FCOSFamily(DenseFamily):
    model_types = (FCOS,)
    default_anchor_size = 8  # torchvision's size-range base

    def build(self, spec: ModelSpec) -> FCOS:
        backbone = self.backbone(spec)
        base = self.anchor_size(spec)
        anchors = AnchorGenerator(tuple((base * 2**i,) for i in range(5)), ((1.0,),) * 5)
        # torchvision's FCOS towers use GroupNorm(32, C), impossible for narrow FPNs: build them here.
        head = FCOSHead(spec.fpn_channels, 1, spec.num_classes + 1, num_convs=0)
        head.classification_head.conv = conv_tower(spec.fpn_channels, spec.head_convs)
        head.regression_head.conv = conv_tower(spec.fpn_channels, spec.head_convs)
        return FCOS(
            backbone,
            spec.num_classes + 1,
            anchor_generator=anchors,
            head=head,
            score_thresh=spec.score_thresh,
            nms_thresh=spec.nms_thresh,
            detections_per_img=spec.detections_per_img,
        )

    def compute_loss(
        self,
        model: nn.Module,
        targets: Targets,
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        feats: list[Tensor],
    ) -> dict[str, Tensor]:
        # FCOS assigns locations by level, so its loss needs each level's size.
        num_per_level = [x.size(2) * x.size(3) for x in feats]
        return model.compute_loss(targets, head_outputs, anchors, num_per_level)
