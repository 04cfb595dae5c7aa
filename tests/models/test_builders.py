"""Builder options that change what a detector is: anchors, assigner, box loss."""

import torch
from torchvision.ops import generalized_box_iou_loss

from detkd.models import DetectorSpec, build_detector


def _retinanet(**kw):
    return build_detector(DetectorSpec(family="retinanet", num_classes=2, fpn_channels=16, head_convs=1, **kw)).model


def test_retinanet_anchor_tiling():
    # Default: torchvision's 3 octave scales x 3 ratios, from anchor_size at p3 doubling per level.
    default = _retinanet(anchor_size=16).anchor_generator
    assert default.sizes[0] == (16, 20, 25) and default.sizes[4] == (256, 322, 406)
    assert default.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert default.num_anchors_per_location() == [9] * 5
    single = _retinanet(anchor_size=16, anchor_scales=1, anchor_ratios=[1.0]).anchor_generator
    assert single.sizes == ((16,), (32,), (64,), (128,), (256,)) and single.num_anchors_per_location() == [1] * 5
    head = _retinanet(anchor_scales=2, anchor_ratios=[1.0]).head
    assert head.classification_head.num_anchors == 2 and head.classification_head.cls_logits.out_channels == 2 * 3


def test_retinanet_regression_uses_giou():
    model = _retinanet(anchor_size=16)
    reg = model.head.regression_head
    anchors = torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 80.0, 60.0]])
    boxes = torch.tensor([[12.0, 8.0, 34.0, 28.0], [38.0, 45.0, 75.0, 70.0]])
    deltas = torch.tensor([[0.1, -0.2, 0.05, 0.3], [0.0, 0.1, -0.1, 0.2]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}]
    loss = reg.compute_loss(targets, {"bbox_regression": deltas[None]}, [anchors], [torch.tensor([0, 1])])
    decoded = reg.box_coder.decode_single(deltas, anchors)
    expected = generalized_box_iou_loss(decoded, boxes, reduction="sum") / 2  # normalised by foreground count
    torch.testing.assert_close(loss, expected)
