"""Detection metrics: COCO AP (faster-coco-eval, pycocotools as fallback) and VOC-style mAP@0.5.

Ground truth comes from Records in original image pixels; ignore regions (COCO crowd, VOC
difficult) become iscrowd annotations, so a detection on them is neither a hit nor a miss.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from detkd.data.sample import Record
from detkd.errors import DetkdError


@dataclass
class EvalResult:
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
    def __init__(self, *, records: list[Record], class_names: list[str]) -> None:
        self.records = {r.image_id: r for r in records}
        self.class_names = list(class_names)
        self.detections: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        if image_id not in self.records:
            raise DetkdError(f"detections for image id {image_id}, which is not in the ground truth")
        self.detections[image_id] = (
            boxes.detach().cpu().reshape(-1, 4).numpy().astype(np.float64),
            scores.detach().cpu().reshape(-1).numpy().astype(np.float64),
            labels.detach().cpu().reshape(-1).numpy().astype(np.int64),
        )

    def compute(self) -> EvalResult:
        if not self.records:
            raise DetkdError("nothing to evaluate: the ground truth has no images")
        stats, per_class, per_class50 = self._coco()
        voc = voc_map50(self.records, self.detections, len(self.class_names))
        return EvalResult(
            AP=stats[0],
            AP50=stats[1],
            AP75=stats[2],
            APs=stats[3],
            APm=stats[4],
            APl=stats[5],
            voc_map50=voc,
            per_class_ap=per_class,
            per_class_ap50=per_class50,
            num_images=len(self.records),
            num_detections=int(sum(len(d[1]) for d in self.detections.values())),
        )

    def _coco_dicts(self) -> tuple[dict, list[dict]]:
        images, anns = [], []
        for r in self.records.values():
            images.append({"id": int(r.image_id), "height": r.height, "width": r.width})
            for box, label, crowd in _gt_items(r):
                x0, y0, x1, y1 = (float(v) for v in box)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": int(r.image_id),
                        "category_id": int(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": crowd,
                    }
                )
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        gt = {"images": images, "annotations": anns, "categories": cats}
        dets = []
        for image_id, (boxes, scores, labels) in self.detections.items():
            for b, s, lab in zip(boxes, scores, labels, strict=True):
                dets.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(lab),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "score": float(s),
                    }
                )
        return gt, dets

    def _coco(self) -> tuple[list[float], dict, dict]:
        gt, dets = self._coco_dicts()
        if not dets:
            names = {n: (0.0 if self._has_gt(i + 1) else None) for i, n in enumerate(self.class_names)}
            return [0.0] * 6, names, dict(names)
        coco_gt, coco_eval_cls = _coco_backend()
        with contextlib.redirect_stdout(io.StringIO()):
            g = coco_gt()
            g.dataset = gt
            g.createIndex()
            d = g.loadRes(dets)
            quiet = {"print_function": lambda *a, **k: None} if coco_eval_cls.__module__.startswith("faster") else {}
            ev = coco_eval_cls(g, d, iouType="bbox", **quiet)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [max(0.0, float(x)) for x in ev.stats[:6]]
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        per_class, per_class50 = {}, {}
        for k, name in enumerate(self.class_names):
            if not self._has_gt(k + 1):
                per_class[name] = per_class50[name] = None
                continue
            p = precision[:, :, k, 0, -1]
            per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
            p50 = precision[0, :, k, 0, -1]
            per_class50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else 0.0
        return stats, per_class, per_class50

    def _has_gt(self, label: int) -> bool:
        return any(bool((r.labels == label).any()) for r in self.records.values())


def _gt_items(r: Record):
    for box, label in zip(r.boxes.tolist(), r.labels.tolist(), strict=True):
        yield box, label, 0
    ignore_labels = r.ignore_labels.tolist() if len(r.ignore_labels) == len(r.ignore) else [0] * len(r.ignore)
    for box, label in zip(r.ignore.tolist(), ignore_labels, strict=True):
        if box[2] > box[0] and box[3] > box[1]:
            yield box, label if label > 0 else 1, 1


def _coco_backend():
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:  # pragma: no cover - pycocotools is the documented fallback
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _overlap(a, b, union=True)


def _overlap(a: np.ndarray, b: np.ndarray, *, union: bool) -> np.ndarray:
    """IoU (union=True) or intersection over the area of ``a`` (union=False) for xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    denom = area_a[:, None] + area_b[None, :] - inter if union else np.repeat(area_a[:, None], len(b), 1)
    return inter / np.maximum(denom, 1e-12)


def voc_map50(records: dict[int, Record], detections: dict, num_classes: int) -> float:
    """VOC2010+ all-point interpolated AP at IoU 0.5, averaged over classes with ground truth.

    A detection is a TP if it matches an unmatched GT box (IoU >= 0.5, best first), a duplicate
    or unmatched detection is an FP, unless it overlaps an ignore region (IoU >= 0.5), in which
    case it is neither (the VOC "difficult" rule).
    """
    aps = []
    for label in range(1, num_classes + 1):
        gts, ignores, dets = {}, {}, []
        n_gt = 0
        for image_id, r in records.items():
            g = r.boxes[r.labels == label].numpy().astype(np.float64)
            gts[image_id] = g
            n_gt += len(g)
            ign_mask = (
                (r.ignore_labels == label)
                if len(r.ignore_labels) == len(r.ignore)
                else torch.ones(len(r.ignore), dtype=bool)
            )
            ignores[image_id] = r.ignore[ign_mask].numpy().astype(np.float64)
        if n_gt == 0:
            continue
        for image_id, (boxes, scores, labels) in detections.items():
            keep = labels == label
            dets += [(s, image_id, b) for s, b in zip(scores[keep], boxes[keep], strict=True)]
        dets.sort(key=lambda d: -d[0])
        matched = {i: np.zeros(len(g), dtype=bool) for i, g in gts.items()}
        tp, fp = [], []
        for _, image_id, box in dets:
            g = gts.get(image_id, np.zeros((0, 4)))
            ious = box_iou(box[None], g)[0] if len(g) else np.zeros(0)
            best = int(ious.argmax()) if len(ious) else -1
            if best >= 0 and ious[best] >= 0.5 and not matched[image_id][best]:
                matched[image_id][best] = True
                tp.append(1), fp.append(0)
            elif best >= 0 and ious[best] >= 0.5:
                tp.append(0), fp.append(1)  # duplicate detection
            else:
                ign = ignores.get(image_id, np.zeros((0, 4)))
                if len(ign) and box_iou(box[None], ign)[0].max() >= 0.5:
                    continue
                tp.append(0), fp.append(1)
        aps.append(_all_point_ap(np.array(tp), np.array(fp), n_gt))
    return float(np.mean(aps)) if aps else 0.0


def _all_point_ap(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    if len(tp) == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def format_table(result: EvalResult) -> str:
    def pct(v):
        return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"

    lines = [
        f"images {result.num_images}, detections {result.num_detections}",
        "  AP    AP50  AP75  APs   APm   APl   | VOC mAP@0.5",
        f"  {pct(result.AP)} {pct(result.AP50)} {pct(result.AP75)} {pct(result.APs)} {pct(result.APm)} "
        f"{pct(result.APl)} | {pct(result.voc_map50)}",
        "",
        f"  {'class':<20} {'AP':>5} {'AP50':>5}",
    ]
    for name, ap in result.per_class_ap.items():
        lines.append(f"  {name:<20} {pct(ap)} {pct(result.per_class_ap50.get(name))}")
    return "\n".join(lines)
