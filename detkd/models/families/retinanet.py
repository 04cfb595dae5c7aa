"""RetinaNet: torchvision's, with GroupNorm heads of any depth, GIoU box loss and an optional ATSS assigner."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from detkd.models.assigners import ATSSRetinaNet
from detkd.models.defaults import ModelSpec
from detkd.models.families.base import DenseFamily, group_norm, register_family


@register_family("retinanet")
class RetinaNetFamily(DenseFamily):
    model_types = (RetinaNet,)  # ATSSRetinaNet is a RetinaNet
    default_anchor_size = 32  # torchvision's
    assigners = ("iou", "atss")

    def build(self, spec: ModelSpec) -> RetinaNet:
        backbone = self.backbone(spec)
        base = self.anchor_size(spec)
        scales = tuple(2 ** (i / spec.anchor_scales) for i in range(spec.anchor_scales))
        anchors = AnchorGenerator(dense_anchor_sizes(base, scales), (tuple(spec.anchor_ratios),) * 5)
        # GroupNorm in the head (torchvision's RetinaNet v2 choice): stable from scratch at small batch.
        head = RetinaNetHead(
            spec.fpn_channels,
            anchors.num_anchors_per_location()[0],
            spec.num_classes + 1,
            norm_layer=group_norm,
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

    def deployable(self, model: nn.Module) -> nn.Module:
        # ATSS only changes training, and TorchScript cannot script its level-size hook.
        return model.for_inference() if isinstance(model, ATSSRetinaNet) else model


def dense_anchor_sizes(base: int, scales: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
    """Per level (5, from ``base`` at the finest, doubling), the anchor sizes of each octave scale."""
    return tuple(tuple(int(base * 2**level * s) for s in scales) for level in range(5))


def _set_tower_depth(tower: nn.Sequential, depth: int) -> nn.Sequential:
    """Keep the first ``depth`` (conv, norm, relu) triples of a torchvision head tower."""
    per_block = len(tower) // 4
    return nn.Sequential(*list(tower.children())[: depth * per_block])
