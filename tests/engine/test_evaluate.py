"""Evaluation: exact AP on hand-made cases, cross-checked against pycocotools itself."""

import json

import numpy as np
import pytest
import torch

from detkd.data.sample import Record
from detkd.engine.evaluate import DetectionEvaluator, _all_point_ap, voc_map50


def _rec(image_id, boxes, labels, ignore=()):
    return Record(
        image_id=image_id,
        file=f"{image_id}.png",
        height=100,
        width=100,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels),
        ignore=torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
        ignore_labels=torch.ones(len(ignore), dtype=torch.int64),
    )


def test_perfect_detections_score_one():
    recs = [_rec(1, [[10, 10, 50, 50], [60, 60, 90, 95]], [1, 2]), _rec(2, [[5, 5, 40, 30]], [1])]
    ev = DetectionEvaluator(records=recs, class_names=["a", "b"])
    for r in recs:
        ev.add(r.image_id, r.boxes, torch.ones(len(r.labels)), r.labels)
    res = ev.compute()
    assert res.AP == pytest.approx(1.0) and res.AP50 == pytest.approx(1.0) and res.voc_map50 == pytest.approx(1.0)
    assert res.per_class_ap == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}


def test_no_detections_is_zero_not_a_crash():
    ev = DetectionEvaluator(records=[_rec(1, [[10, 10, 50, 50]], [1])], class_names=["a", "b"])
    res = ev.compute()
    assert (res.AP, res.voc_map50, res.per_class_ap["b"]) == (0.0, 0.0, None)


def test_hand_computed_voc_ap():
    # 2 GT boxes of class 1. Detections by score: FP (0.9), TP (0.8, IoU 1), TP (0.7, IoU 0.6).
    # precision/recall: (0/1, 0), (1/2, .5), (2/3, 1). All-point AP = 0.5*0.6667 + 0.5*0.6667 = 0.6667.
    recs = [_rec(1, [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    dets = {
        1: (
            np.array([[80, 80, 90, 90], [0, 0, 10, 10], [50, 50, 60, 62.5]], dtype=float),
            np.array([0.9, 0.8, 0.7]),
            np.array([1, 1, 1]),
        )
    }
    # IoU of the third box with GT 2: 100 / 125 = 0.8 >= 0.5
    assert voc_map50({r.image_id: r for r in recs}, dets, 1) == pytest.approx(2 / 3)
    assert _all_point_ap(np.array([1, 0, 1]), np.array([0, 1, 0]), 2) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_detection_on_ignore_region_is_not_a_false_positive():
    recs = [_rec(1, [[0, 0, 10, 10]], [1], ignore=[[40, 40, 80, 80]])]
    ev = DetectionEvaluator(records=recs, class_names=["a"])
    ev.add(1, torch.tensor([[40.0, 40, 80, 80], [0, 0, 10, 10]]), torch.tensor([0.9, 0.8]), torch.tensor([1, 1]))
    res = ev.compute()
    assert res.voc_map50 == pytest.approx(1.0)
    assert res.AP50 == pytest.approx(1.0)


def test_coco_ap_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(0)
    recs, ev_dets = [], []
    for i in range(1, 9):
        xy = torch.rand(3, 2, generator=g) * 60
        wh = torch.rand(3, 2, generator=g) * 30 + 5
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 3, (3,), generator=g)
        recs.append(_rec(i, boxes.tolist(), labels.tolist()))
        noisy = boxes + torch.randn(boxes.shape, generator=g) * 3
        ev_dets.append((i, noisy, torch.rand(3, generator=g), labels))
    ev = DetectionEvaluator(records=recs, class_names=["a", "b"])
    for d in ev_dets:
        ev.add(*d)
    ours = ev.compute()
    gt, dets = ev._coco_dicts()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    ref = COCOeval(coco, coco.loadRes(dets), "bbox")
    ref.evaluate(), ref.accumulate(), ref.summarize()
    assert ours.AP == pytest.approx(ref.stats[0], abs=1e-6)
    assert ours.AP50 == pytest.approx(ref.stats[1], abs=1e-6)
    assert 0 < ours.AP < 1
