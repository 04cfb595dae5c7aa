"""Detection metrics: COCO AP (faster-coco-eval, pycocotools as fallback) and VOC-style mAP@0.5.

Ground truth comes from Records in original image pixels. Ignore regions (COCO crowd, VOC
difficult, KITTI DontCare) become COCO ``iscrowd`` annotations, so a detection on them is
neither a hit nor a false positive, and a missed one is no miss. GT areas are box areas (Records
hold no masks), so APs/APm/APl can differ slightly from numbers computed on COCO's mask areas.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import Tensor

from detkd.data.sample import ImageRecord
from detkd.errors import DetkdError

# Ignore label that excuses detections of every class (KITTI DontCare).
ANY_CLASS = 0

# Detections of one image as numpy arrays: boxes [N, 4] xyxy, scores [N], labels [N].
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class EvalResult:
    """COCO box metrics in [0, 1] plus VOC mAP@0.5.

    A metric is NaN when nothing defines it (COCO's -1), e.g. APs on a data set without small
    objects. Per-class values are None for classes without ground truth.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    voc_map50: float
    per_class_ap: dict[str, float | None] = field(default_factory=dict)
    per_class_ap50: dict[str, float | None] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class DetectionEvaluator:
    """Collects detections per image and scores them against the Records' ground truth.

    ``add`` calls for the same image accumulate. COCO keeps the 100 best-scoring detections of an
    image (its maxDets); the VOC metric uses all of them.
    """

    def __init__(self, *, records: Iterable[ImageRecord], class_names: list[str]) -> None:
        self.class_names = list(class_names)
        if not self.class_names:
            raise DetkdError("DetectionEvaluator needs at least one class name")
        self.records: dict[int, ImageRecord] = {}
        for r in records:
            if r.image_id in self.records:
                raise DetkdError(f"image id {r.image_id} appears twice in the ground truth ({r.file})")
            _check_labels(r.labels, len(self.class_names), f"ground truth of image {r.image_id} ({r.file})")
            self.records[r.image_id] = r
        self.detections: dict[int, Detections] = {}

    def add(self, image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        """Detections of one image: xyxy boxes in original pixels, scores, labels in 1..K."""
        if image_id not in self.records:
            raise DetkdError(f"detections for image id {image_id}, which is not in the ground truth")
        b = boxes.detach().cpu().double().numpy().reshape(-1, 4)
        s = scores.detach().cpu().double().numpy().reshape(-1)
        lab = labels.detach().cpu().long().numpy().reshape(-1)
        if not len(b) == len(s) == len(lab):
            raise DetkdError(f"image {image_id}: {len(b)} boxes, {len(s)} scores and {len(lab)} labels")
        _check_labels(lab, len(self.class_names), f"detections of image {image_id}")
        if image_id in self.detections:
            old = self.detections[image_id]
            b, s, lab = (np.concatenate([o, n]) for o, n in zip(old, (b, s, lab), strict=True))
        self.detections[image_id] = (b, s, lab)

    def compute(self, *, verbose: bool = False) -> EvalResult:
        """Run both metrics; ``verbose`` prints COCO's usual summary."""
        if not self.records:
            raise DetkdError("nothing to evaluate: the ground truth has no images")
        stats, per_class, per_class50 = self._coco(verbose=verbose)
        voc = voc_ap_per_class(self.records.values(), self.detections, num_classes=len(self.class_names))
        voc_values = [v for v in voc.values() if v is not None]
        return EvalResult(
            AP=stats[0],
            AP50=stats[1],
            AP75=stats[2],
            APs=stats[3],
            APm=stats[4],
            APl=stats[5],
            voc_map50=float(np.mean(voc_values)) if voc_values else math.nan,
            per_class_ap=per_class,
            per_class_ap50=per_class50,
            num_images=len(self.records),
            num_detections=int(sum(len(d[1]) for d in self.detections.values())),
        )

    def coco_dicts(self) -> tuple[dict, list[dict]]:
        """Ground truth as a COCO json dict and detections as a COCO results list (xywh boxes)."""
        num_classes = len(self.class_names)
        images, anns = [], []

        def add_ann(image_id: int, box: list[float], label: int, crowd: int) -> None:
            x0, y0, x1, y1 = box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": crowd,
                }
            )

        for r in self.records.values():
            image_id = int(r.image_id)
            images.append({"id": image_id, "height": int(r.height), "width": int(r.width)})
            for box, label in zip(r.boxes.tolist(), r.labels.tolist(), strict=True):
                add_ann(image_id, box, int(label), 0)
            for box, label in zip(r.ignore.tolist(), _ignore_labels(r).tolist(), strict=True):
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
                # COCO crowd regions belong to one category; an any-class region needs one per class.
                for lab in range(1, num_classes + 1) if label == ANY_CLASS else [label]:
                    if 1 <= lab <= num_classes:
                        add_ann(image_id, box, int(lab), 1)
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        dets = []
        for image_id, (boxes, scores, labels) in self.detections.items():
            for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
                dets.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(lab),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": s,
                    }
                )
        return {"images": images, "annotations": anns, "categories": cats}, dets

    def _coco(self, *, verbose: bool) -> tuple[list[float], dict, dict]:
        gt, dets = self.coco_dicts()
        coco_cls, eval_cls = _coco_backend()
        kwargs = (
            {} if eval_cls.__module__.startswith("pycocotools") else {"print_function": print if verbose else _mute}
        )
        out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with out:
            coco_gt = _coco_from_dict(coco_cls, gt)
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # pycocotools' loadRes fails on an empty list; an empty result set is valid though
                coco_dt = _coco_from_dict(coco_cls, {**gt, "annotations": []})
            ev = eval_cls(coco_gt, coco_dt, iouType="bbox", **kwargs)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [float(x) if x >= 0 else math.nan for x in ev.stats[:6]]
        precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]; -1 where undefined
        per_class: dict[str, float | None] = {}
        per_class50: dict[str, float | None] = {}
        for k, name in enumerate(self.class_names):
            p = precision[:, :, k, 0, -1]  # area "all", maxDets 100
            p50 = precision[0, :, k, 0, -1]
            per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else None
            per_class50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else None
        return stats, per_class, per_class50


def _mute(*args, **kwargs) -> None:
    pass


def _check_labels(labels, num_classes: int, what: str) -> None:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 1 or labels.max() > num_classes):
        raise DetkdError(
            f"{what}: labels must be in 1..{num_classes} (one per class name), got {sorted(set(labels.tolist()))}"
        )


def _ignore_labels(r: ImageRecord) -> np.ndarray:
    # Records without per-region labels excuse every class.
    if len(r.ignore_labels) == len(r.ignore):
        return r.ignore_labels.numpy().astype(np.int64)
    return np.full(len(r.ignore), ANY_CLASS, dtype=np.int64)


def _coco_backend():
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:  # pycocotools is the documented fallback
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def _coco_from_dict(coco_cls, dataset: dict):
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes."""
    return _overlap(a, b, union=True)


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``a`` [len(a), len(b)]: COCO's overlap with crowd regions."""
    return _overlap(a, b, union=False)


def _overlap(a: np.ndarray, b: np.ndarray, *, union: bool) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    denom = area_a[:, None] + area_b[None, :] - inter if union else np.broadcast_to(area_a[:, None], inter.shape)
    return inter / np.maximum(denom, 1e-12)


def voc_ap_per_class(
    records: Iterable[ImageRecord],
    detections: Mapping[int, Detections],
    *,
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict[int, float | None]:
    """VOC2010+ all-point interpolated AP per label 1..K (None for labels without ground truth).

    Per class, detections are taken best score first. A detection whose best-IoU GT box (of its
    image and class) reaches ``iou_threshold`` is a TP if that box is still unmatched and an FP
    (duplicate) otherwise. A detection matching no GT box is ignored (neither TP nor FP) when it
    lies on an ignore region of its class or ANY_CLASS, measured like COCO crowds as intersection
    over the detection's area >= ``iou_threshold``; otherwise it is an FP. Boxes are continuous
    coordinates (no VOC "+1" pixel convention), as in COCO.
    """
    gt = {}
    n_gt = np.zeros(num_classes + 2, dtype=np.int64)
    for r in records:
        labels = r.labels.numpy().astype(np.int64).reshape(-1)
        gt[r.image_id] = (
            r.boxes.numpy().astype(np.float64).reshape(-1, 4),
            labels,
            r.ignore.numpy().astype(np.float64).reshape(-1, 4),
            _ignore_labels(r),
        )
        n_gt += np.bincount(np.clip(labels, 0, num_classes + 1), minlength=num_classes + 2)
    # Which images hold detections of each label, in insertion order: each class visits only those.
    images_of: dict[int, list[int]] = {}
    for image_id, (_, _, det_labels) in detections.items():
        for lab in np.unique(det_labels).tolist():
            images_of.setdefault(lab, []).append(image_id)
    empty = np.zeros((0, 4))
    aps: dict[int, float | None] = {}
    for label in range(1, num_classes + 1):
        if n_gt[label] == 0:
            aps[label] = None
            continue
        # Per image: IoU of its class-`label` detections with its GT boxes, and overlap with ignore regions.
        scores, owner, row = [], [], []
        ious, on_ignore = {}, {}
        for image_id in images_of.get(label, []):
            boxes, det_scores, det_labels = detections[image_id]
            keep = det_labels == label
            det_boxes = boxes[keep]
            g_boxes, g_labels, ign, ign_labels = gt.get(image_id, (empty, np.zeros(0, np.int64), empty, np.zeros(0)))
            ious[image_id] = box_iou(det_boxes, g_boxes[g_labels == label])
            regions = ign[(ign_labels == label) | (ign_labels == ANY_CLASS)]
            on_ignore[image_id] = (box_ioa(det_boxes, regions) >= iou_threshold).any(1)
            scores.append(det_scores[keep])
            owner += [image_id] * int(keep.sum())
            row.append(np.arange(int(keep.sum())))
        if not scores:
            aps[label] = 0.0
            continue
        order = np.argsort(-np.concatenate(scores), kind="stable")  # ties keep insertion order
        rows = np.concatenate(row)
        matched = {image_id: np.zeros(m.shape[1], dtype=bool) for image_id, m in ious.items()}
        tp, fp = [], []
        for i in order:
            image_id, j = owner[i], rows[i]
            iou_row = ious[image_id][j]
            best = int(iou_row.argmax()) if len(iou_row) else -1
            if best >= 0 and iou_row[best] >= iou_threshold:
                hit = not matched[image_id][best]
                matched[image_id][best] = True
                tp.append(int(hit))
                fp.append(int(not hit))
            elif not on_ignore[image_id][j]:
                tp.append(0)
                fp.append(1)
        aps[label] = all_point_ap(np.array(tp), np.array(fp), int(n_gt[label]))
    return aps


def voc_map50(records: Iterable[ImageRecord], detections: Mapping[int, Detections], *, num_classes: int) -> float:
    """Mean of ``voc_ap_per_class`` over classes with ground truth (NaN when none has any)."""
    values = [v for v in voc_ap_per_class(records, detections, num_classes=num_classes).values() if v is not None]
    return float(np.mean(values)) if values else math.nan


def all_point_ap(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """Area under the precision envelope, detections in score order (VOC2010+ / VOCdevkit voc_ap)."""
    if len(tp) == 0 or n_gt == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at recall >= r
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


# Names users read for the metric keys; every printed AP is x100 (files keep fractions in [0, 1]).
AP_LABELS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "voc_map50": "VOC mAP@0.5"}


def _pct(v: float | None, width: int = 5) -> str:
    return "n/a".rjust(width) if v is None or not math.isfinite(v) else f"{100 * v:{width}.1f}"


def ap_summary(metrics: Mapping, keys: Iterable[str] = ("AP", "AP50", "AP75", "voc_map50")) -> str:
    """One line of the metrics present, x100 and labelled: "AP (x100): AP 6.3, AP50 12.1"; "" if none."""
    shown = [f"{AP_LABELS.get(k, k)} {_pct(metrics[k], 0)}" for k in keys if k in metrics]
    return "AP (x100): " + ", ".join(shown) if shown else ""


def format_table(result: EvalResult) -> str:
    """Overall metrics, then AP and AP50 per class, x100."""
    pct = _pct
    width = max([5, *(len(n) for n in result.per_class_ap)])
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = [
        f"images {result.num_images}, detections {result.num_detections}",
        "AP (x100): COCO AP@[.5:.95], AP50, AP75, AP by object size (s/m/l); VOC mAP@0.5",
        "  " + " ".join(f"{k:>5}" for k in keys) + " | VOC mAP@0.5",
        "  " + " ".join(pct(getattr(result, k)) for k in keys) + f" | {pct(result.voc_map50):>11}",
        "",
        f"  {'class':<{width}} {'AP':>5} {'AP50':>5}",
    ]
    for name, ap in result.per_class_ap.items():
        lines.append(f"  {name:<{width}} {pct(ap)} {pct(result.per_class_ap50.get(name))}")
    return "\n".join(lines)
