"""Evaluation: exact AP on hand-made cases, cross-checked against pycocotools and a literal VOC loop."""

import contextlib
import io
import math
import sys

import numpy as np
import pytest
import torch

from detkd.data.sample import ImageRecord
from detkd.engine.metrics import (
    ANY_CLASS,
    DetectionEvaluator,
    all_point_ap,
    format_table,
    voc_ap_per_class,
    voc_map50,
)
from detkd.errors import DetkdError


def _rec(image_id, boxes, labels, ignore=(), ignore_labels=None, size=100):
    return ImageRecord(
        image_id=image_id,
        file=f"{image_id}.png",
        height=size,
        width=size,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64).reshape(-1),
        ignore=torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
        ignore_labels=torch.tensor([1] * len(ignore) if ignore_labels is None else ignore_labels, dtype=torch.int64),
    )


def _evaluate(recs, dets, class_names, **kw):
    ev = DetectionEvaluator(records=recs, class_names=class_names)
    for image_id, boxes, scores, labels in dets:
        ev.add(image_id, torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(labels))
    return ev.compute(**kw)


def test_perfect_detections_score_one():
    recs = [_rec(1, [[10, 10, 50, 50], [60, 60, 90, 95]], [1, 2]), _rec(2, [[5, 5, 40, 30]], [1])]
    res = _evaluate(
        recs, [(r.image_id, r.boxes.tolist(), [1.0] * len(r.labels), r.labels.tolist()) for r in recs], ["a", "b"]
    )
    assert (res.AP, res.AP50, res.AP75, res.voc_map50) == (1.0, 1.0, 1.0, 1.0)
    assert res.per_class_ap == {"a": 1.0, "b": 1.0} and res.per_class_ap50 == {"a": 1.0, "b": 1.0}
    assert (res.num_images, res.num_detections) == (2, 3)


def test_hand_computed_case():
    # Two GT boxes of class 1: A = [0,0,10,10], B = [50,50,60,60]. Detections, best score first:
    #   d1 0.9 [80,80,90,90]  overlaps nothing           -> FP at every IoU threshold
    #   d2 0.8 = A            IoU 1                        -> TP at every threshold
    #   d3 0.7 [50,50,60,66]  IoU with B = 100/160 = 0.625 -> TP for t in {.50,.55,.60}, FP for t >= .65
    # IoU >= 0.5, cumulative (recall, precision): (0, 0), (1/2, 1/2), (1, 2/3).
    #   VOC all-point: envelope is 2/3 over recall [0, 1]             -> AP = 2/3.
    #   COCO 101-point: precision at every recall threshold is 2/3   -> AP50 = 2/3.
    # IoU >= 0.65: (0, 0), (1/2, 1/2), (1/2, 1/3); envelope 1/2 for recall <= 1/2, then nothing.
    #   COCO: recall thresholds 0, .01, ..., .50 (51 of 101) get 1/2  -> AP_t = 51/101 * 1/2.
    # AP@[.5:.95] = (3 * 2/3 + 7 * 51/202) / 10.
    recs = [_rec(1, [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    dets = [(1, [[80, 80, 90, 90], [0, 0, 10, 10], [50, 50, 60, 66]], [0.9, 0.8, 0.7], [1, 1, 1])]
    res = _evaluate(recs, dets, ["a"])
    assert res.voc_map50 == pytest.approx(2 / 3, abs=1e-12)
    assert res.AP50 == pytest.approx(2 / 3, abs=1e-12)
    assert res.AP75 == pytest.approx(51 / 202, abs=1e-12)
    assert res.AP == pytest.approx((3 * 2 / 3 + 7 * 51 / 202) / 10, abs=1e-12)
    assert res.per_class_ap["a"] == pytest.approx(res.AP, abs=1e-12)
    assert res.per_class_ap50["a"] == pytest.approx(2 / 3, abs=1e-12)
    # Boxes 10x10 and 10x16 are all "small" (< 32^2); no medium or large GT, so those are undefined.
    assert res.APs == pytest.approx(res.AP, abs=1e-12) and math.isnan(res.APm) and math.isnan(res.APl)


def test_all_point_ap_by_hand():
    # TP, FP, TP of 2 GT: (recall, precision) (1/2, 1), (1/2, 1/2), (1, 2/3) -> 1/2 * 1 + 1/2 * 2/3.
    assert all_point_ap(np.array([1, 0, 1]), np.array([0, 1, 0]), 2) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
    # A later, better precision lifts the envelope: FP, TP, TP, TP of 4 GT -> recall 3/4 at precision 3/4.
    assert all_point_ap(np.array([0, 1, 1, 1]), np.array([1, 0, 0, 0]), 4) == pytest.approx(0.75 * 0.75)


def test_duplicate_detection_is_a_false_positive():
    # The second detection hits A again (IoU 100/105): a duplicate, so an FP between two hits.
    # TP, FP, TP of 2 GT -> 1/2 * 1 + 1/2 * 2/3 (as in test_all_point_ap_by_hand).
    recs = [_rec(1, [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    dets = [(1, [[0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 1, 1])]
    assert _evaluate(recs, dets, ["a"]).voc_map50 == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_detection_on_ignore_region_is_not_a_false_positive():
    # Class 1 has an ignore region R. A class-1 detection on R (score .9) is excused; the same box
    # labelled 2 is a plain FP ahead of the class-2 hit: class 2 has (0, 0), (1, 1/2) -> AP 1/2.
    # mAP = (1 + 1/2) / 2 at every IoU threshold (the hits are exact) in both metrics.
    recs = [_rec(1, [[0, 0, 10, 10], [20, 0, 30, 10]], [1, 2], ignore=[[40, 40, 80, 80]], ignore_labels=[1])]
    dets = [
        (1, [[40, 40, 80, 80], [0, 0, 10, 10], [40, 40, 80, 80], [20, 0, 30, 10]], [0.9, 0.8, 0.9, 0.8], [1, 1, 2, 2])
    ]
    res = _evaluate(recs, dets, ["a", "b"])
    assert res.voc_map50 == pytest.approx(0.75, abs=1e-12)
    assert (res.AP50, res.AP) == (pytest.approx(0.75, abs=1e-12), pytest.approx(0.75, abs=1e-12))
    assert res.per_class_ap == {"a": pytest.approx(1.0), "b": pytest.approx(0.5)}
    # An ANY_CLASS region (KITTI DontCare) excuses both.
    recs[0].ignore_labels = torch.tensor([ANY_CLASS])
    res = _evaluate(recs, dets, ["a", "b"])
    assert (res.voc_map50, res.AP) == (pytest.approx(1.0), pytest.approx(1.0))


def test_ignore_overlap_is_measured_over_the_detection_like_coco_crowds():
    # A small detection inside a big crowd region: IoU 100/10000 = 0.01, but intersection over the
    # detection's area is 1, so COCO ignores it, and so must the VOC metric.
    recs = [_rec(1, [[110, 110, 130, 130]], [1], ignore=[[0, 0, 100, 100]], size=200)]
    dets = [(1, [[10, 10, 20, 20], [110, 110, 130, 130]], [0.9, 0.8], [1, 1])]
    res = _evaluate(recs, dets, ["a"])
    assert (res.voc_map50, res.AP) == (pytest.approx(1.0), pytest.approx(1.0))


def test_images_and_classes_without_ground_truth():
    # Image 2 has no GT: its detection is an FP ahead of the hit -> (0, 0), (1, 1/2) -> AP 1/2.
    # Class "c" has no GT anywhere: None per class, and left out of both means.
    recs = [_rec(1, [[0, 0, 10, 10]], [1]), _rec(2, [], [])]
    dets = [(1, [[0, 0, 10, 10]], [0.5], [1]), (2, [[0, 0, 10, 10], [5, 5, 9, 9]], [0.9, 0.7], [1, 3])]
    res = _evaluate(recs, dets, ["a", "b", "c"])
    assert res.per_class_ap == {"a": pytest.approx(0.5), "b": None, "c": None}
    assert res.voc_map50 == pytest.approx(0.5) and res.AP == pytest.approx(0.5)
    assert res.num_detections == 3
    table = format_table(res)
    assert "a" in table and "50.0" in table and "n/a" in table


def test_no_detections_is_zero_not_a_crash():
    res = _evaluate([_rec(1, [[10, 10, 50, 50]], [1])], [], ["a", "b"])
    assert (res.AP, res.AP50, res.voc_map50, res.num_detections) == (0.0, 0.0, 0.0, 0)
    assert res.per_class_ap == {"a": 0.0, "b": None}
    assert math.isnan(res.APs)  # 40x40 is a medium box: no small GT to score


def test_errors_and_accumulation():
    with pytest.raises(DetkdError, match="no images"):
        DetectionEvaluator(records=[], class_names=["a"]).compute()
    with pytest.raises(DetkdError, match="appears twice"):
        DetectionEvaluator(records=[_rec(1, [], []), _rec(1, [], [])], class_names=["a"])
    with pytest.raises(DetkdError, match="labels must be in 1..1"):
        DetectionEvaluator(records=[_rec(1, [[0, 0, 5, 5]], [2])], class_names=["a"])
    ev = DetectionEvaluator(records=[_rec(1, [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])], class_names=["a"])
    with pytest.raises(DetkdError, match="not in the ground truth"):
        ev.add(7, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(DetkdError, match="labels must be in"):
        ev.add(1, torch.zeros(1, 4), torch.ones(1), torch.tensor([0]))
    # Two add() calls for one image accumulate: FP (.9) + TP (.8), then TP (.7) -> 2/3 as in the hand case.
    ev.add(1, torch.tensor([[80.0, 80, 90, 90], [0, 0, 10, 10]]), torch.tensor([0.9, 0.8]), torch.tensor([1, 1]))
    ev.add(1, torch.tensor([[50.0, 50, 60, 60]]), torch.tensor([0.7]), torch.tensor([1]))
    assert ev.compute().voc_map50 == pytest.approx(2 / 3)


def test_evaluation_is_silent_unless_asked(capsys):
    recs = [_rec(1, [[0, 0, 10, 10]], [1])]
    _evaluate(recs, [(1, [[0, 0, 10, 10]], [0.5], [1])], ["a"])
    assert capsys.readouterr().out == ""
    _evaluate(recs, [(1, [[0, 0, 10, 10]], [0.5], [1])], ["a"], verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def _random_case(seed, n_images=10, num_classes=3):
    """GT of classes 1..num_classes-1 (the last class has none), ignore regions, and noisy detections."""
    rng = np.random.default_rng(seed)
    recs, dets = [], []
    for image_id in range(1, n_images + 1):
        n = int(rng.integers(0, 5))  # some images have no GT
        xy = rng.uniform(0, 150, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 80, (n, 2))], 1)
        labels = rng.integers(1, num_classes, n)
        m = int(rng.integers(0, 3))
        ixy = rng.uniform(0, 150, (m, 2))
        ignore = np.concatenate([ixy, ixy + rng.uniform(20, 90, (m, 2))], 1)
        ignore_labels = rng.integers(0, num_classes, m)  # 0 = ANY_CLASS
        recs.append(_rec(image_id, boxes.tolist(), labels.tolist(), ignore.tolist(), ignore_labels.tolist(), 256))
        # Jittered hits (some relabelled), duplicates, boxes inside ignore regions, and random boxes.
        d_boxes = [boxes + rng.normal(0, 6, boxes.shape), boxes[: n // 2] + rng.normal(0, 3, (n // 2, 4))]
        d_labels = [np.where(rng.random(n) < 0.2, rng.integers(1, num_classes + 1, n), labels), labels[: n // 2]]
        if m:
            inner = ignore[:, :2] + rng.uniform(0, 10, (m, 2))
            d_boxes.append(np.concatenate([inner, inner + 8], 1))
            d_labels.append(rng.integers(1, num_classes + 1, m))
        k = int(rng.integers(0, 4))
        rxy = rng.uniform(0, 200, (k, 2))
        d_boxes.append(np.concatenate([rxy, rxy + rng.uniform(5, 50, (k, 2))], 1))
        d_labels.append(rng.integers(1, num_classes + 1, k))
        b = np.concatenate(d_boxes)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        dets.append((image_id, b.tolist(), rng.random(len(b)).tolist(), np.concatenate(d_labels).tolist()))
    return recs, dets


def _reference_voc(recs, dets, num_classes):
    """Deliberately literal VOCdevkit-style loop (plus the ignore rule), independent of the module."""

    def area(b):
        return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])

    def inter(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    by_id = {r.image_id: r for r in recs}
    aps = []
    for c in range(1, num_classes + 1):
        npos = sum(int(lab == c) for r in recs for lab in r.labels.tolist())
        if npos == 0:
            continue
        cand = [
            (s, i, b)
            for i, boxes, scores, labels in dets
            for b, s, lab in zip(boxes, scores, labels, strict=True)
            if lab == c
        ]
        cand.sort(key=lambda t: -t[0])
        used, tp, fp = set(), [], []
        for _, image_id, box in cand:
            r = by_id[image_id]
            best, best_j = -1.0, None
            for j, (g, lab) in enumerate(zip(r.boxes.tolist(), r.labels.tolist(), strict=True)):
                if lab == c:
                    iou = inter(box, g) / (area(box) + area(g) - inter(box, g))
                    if iou > best:
                        best, best_j = iou, j
            if best >= 0.5:
                tp.append(0 if (image_id, best_j) in used else 1)
                fp.append(1 - tp[-1])
                used.add((image_id, best_j))
                continue
            regions = [g for g, lab in zip(r.ignore.tolist(), r.ignore_labels.tolist(), strict=True) if lab in (c, 0)]
            if any(inter(box, g) / area(box) >= 0.5 for g in regions):
                continue
            tp.append(0)
            fp.append(1)
        rec, prec, ctp, cfp = [], [], 0, 0
        for t, f in zip(tp, fp, strict=True):
            ctp, cfp = ctp + t, cfp + f
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp))
        mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        aps.append(sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]))
    return sum(aps) / len(aps)


@pytest.mark.parametrize("seed", range(6))
def test_voc_map50_matches_literal_reference(seed):
    recs, dets = _random_case(seed)
    ref = _reference_voc(recs, dets, 3)
    as_np = {i: (np.array(b, dtype=np.float64).reshape(-1, 4), np.array(s), np.array(lab)) for i, b, s, lab in dets}
    assert voc_map50(recs, as_np, num_classes=3) == pytest.approx(ref, abs=1e-12)
    assert voc_ap_per_class(recs, as_np, num_classes=3)[3] is None
    assert 0.05 < ref < 0.95  # the random case is neither trivial nor hopeless
    # The evaluator (float32 boxes on the way in) agrees to float32 precision.
    assert _evaluate(recs, dets, ["a", "b", "c"]).voc_map50 == pytest.approx(ref, abs=1e-6)


def test_coco_ap_matches_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    recs, dets = _random_case(11, n_images=16)
    ev = DetectionEvaluator(records=recs, class_names=["a", "b", "c"])
    for image_id, boxes, scores, labels in dets:
        ev.add(image_id, torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels))
    ours = ev.compute()
    gt, results = ev.coco_dicts()
    assert any(a["iscrowd"] for a in gt["annotations"])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ref = COCOeval(coco, coco.loadRes(results), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ref.stats[:6], strict=True):
        assert getattr(ours, name) == pytest.approx(value if value >= 0 else math.nan, abs=1e-9, nan_ok=True), name
    assert 0.05 < ours.AP < 0.95
    for k, name in enumerate(["a", "b"]):
        p = ref.eval["precision"][:, :, k, 0, -1]
        assert ours.per_class_ap[name] == pytest.approx(p[p > -1].mean(), abs=1e-9)
    assert ours.per_class_ap["c"] is None


def test_pycocotools_fallback_gives_the_same_numbers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    recs = [_rec(1, [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    res = _evaluate(
        recs, [(1, [[80, 80, 90, 90], [0, 0, 10, 10], [50, 50, 60, 66]], [0.9, 0.8, 0.7], [1, 1, 1])], ["a"]
    )
    assert res.AP == pytest.approx((3 * 2 / 3 + 7 * 51 / 202) / 10, abs=1e-12)
    assert _evaluate(recs, [], ["a"]).AP == 0.0  # pycocotools' loadRes cannot take an empty list
    assert capsys.readouterr().out == ""
