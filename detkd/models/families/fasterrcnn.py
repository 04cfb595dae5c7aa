"""Faster R-CNN: torchvision's two-stage detector (RPN + RoI heads) on a P2-P6 FPN."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign

from detkd.models.defaults import ModelSpec
from detkd.models.families.base import DetectorFamily, Features, Targets, register_family


@register_family("fasterrcnn")
class FasterRCNNFamily(DetectorFamily):
    model_types = (FasterRCNN,)
    default_anchor_size = 32  # torchvision's
    fpn_extra = "pool"
    returned_layers = (1, 2, 3, 4)

    def build(self, spec: ModelSpec) -> FasterRCNN:
        backbone = self.backbone(spec)
        base = self.anchor_size(spec)
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

    def losses(
        self, model: nn.Module, features: Features, image_list: ImageList, targets: Targets
    ) -> dict[str, Tensor]:
        proposals, rpn_losses = model.rpn(image_list, features, targets)
        _, roi_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**roi_losses, **rpn_losses}

    def predict(self, model: nn.Module, features: Features, image_list: ImageList) -> list[dict[str, Tensor]]:
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        return detections

    def train_mode_heads(self, model: nn.Module) -> list[nn.Module]:
        return [model.rpn, model.roi_heads]
