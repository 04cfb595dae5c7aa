"""ATSS assignment against a slow, loop-by-loop reference of the paper's algorithm."""

import math
import statistics

import pytest
import torch

from detkd.models import DetectorSpec, build_detector
from detkd.models.assigners import ATSSRetinaNet, atss_assign


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _centre(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _reference(boxes, anchors, per_level, top_k):
    """ATSS (Zhang et al. 2020, Alg. 1) written out per box, per level, in plain Python."""
    best = [(-1.0, -1)] * len(anchors)  # (iou, box) claimed per anchor
    for g, box in enumerate(boxes):
        cx, cy = _centre(box)
        candidates = []
        start = 0
        for count in per_level:
            level = list(range(start, start + count))
            level.sort(
                key=lambda a: math.dist(
                    (cx, cy), ((anchors[a][0] + anchors[a][2]) / 2, (anchors[a][1] + anchors[a][3]) / 2)
                )
            )
            candidates += level[: min(top_k, count)]
            start += count
        ious = [_iou(box, anchors[a]) for a in candidates]
        threshold = statistics.mean(ious) + statistics.stdev(ious)
        for a, iou in zip(candidates, ious, strict=True):
            ax, ay = _centre(anchors[a])
            inside = box[0] < ax < box[2] and box[1] < ay < box[3]
            if iou >= threshold and inside and iou > best[a][0]:
                best[a] = (iou, g)
    return [g for _, g in best]


def _random_problem(seed, num_boxes=5, per_level=(40, 20, 10)):
    g = torch.Generator().manual_seed(seed)
    anchors = []
    for level, count in enumerate(per_level):
        size = 8.0 * 2**level
        # Jittered centres: no two anchors are equally far from a box centre, so the top-k is unique.
        centres = torch.rand(count, 2, generator=g) * 64
        half = size / 2 * (0.75 + 0.5 * torch.rand(count, 2, generator=g))
        anchors.append(torch.cat([centres - half, centres + half], dim=1))
    xy = torch.rand(num_boxes, 2, generator=g) * 48
    wh = 4 + torch.rand(num_boxes, 2, generator=g) * 28
    boxes = torch.cat([xy, xy + wh], dim=1)
    return boxes.double(), torch.cat(anchors).double(), list(per_level)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_k", [1, 3, 9])
def test_atss_equals_reference(seed, top_k):
    boxes, anchors, per_level = _random_problem(seed)
    ours = atss_assign(boxes, anchors, per_level, top_k=top_k)
    expected = _reference(boxes.tolist(), anchors.tolist(), per_level, top_k)
    assert ours.tolist() == expected
    if top_k > 1:
        assert (ours >= 0).any()  # the problem is not degenerate


def test_atss_properties():
    boxes, anchors, per_level = _random_problem(7, num_boxes=8)
    matched = atss_assign(boxes, anchors, per_level, top_k=5)
    pos = torch.nonzero(matched >= 0).squeeze(1)
    centres = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    owner = boxes[matched[pos]]
    # Every positive anchor's centre lies inside the box it was given to ...
    assert ((centres > owner[:, :2]) & (centres < owner[:, 2:])).all()
    # ... and at most top_k per level are candidates of one box.
    for g in range(len(boxes)):
        assert (matched == g).sum() <= 5 * len(per_level)
    empty = atss_assign(torch.zeros(0, 4, dtype=torch.float64), anchors, per_level)
    assert (empty == -1).all() and empty.shape == (anchors.shape[0],)
    with pytest.raises(ValueError, match="anchors_per_level"):
        atss_assign(boxes, anchors, [1, 2])


def test_atss_retinanet_built_and_refused_elsewhere():
    det = build_detector(
        DetectorSpec(family="retinanet", num_classes=2, fpn_channels=16, head_convs=1, assigner="atss")
    )
    assert isinstance(det.model, ATSSRetinaNet)
    with pytest.raises(ValueError, match="retinanet only"):
        build_detector(DetectorSpec(family="fcos", num_classes=2, fpn_channels=16, assigner="atss"))
    with pytest.raises(ValueError, match="unknown assigner"):
        build_detector(DetectorSpec(family="retinanet", num_classes=2, fpn_channels=16, assigner="maxiou"))
