"""Cityscapes gtFine polygons of the 8 instance classes -> boxes; ``*group`` labels -> ignore regions."""

from __future__ import annotations

import json
from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource, make_record
from detkd.data.formats.voc import stable_image_id
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

CITYSCAPES_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


@FORMATS.register("cityscapes")
class CityscapesSource(DetectionSource):
    format_name = "cityscapes"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        root = Path(root)
        problems = ProblemLog()
        gt_dir = root / "gtFine" / split
        if not gt_dir.is_dir():
            raise DataError(f"{gt_dir}: split folder not found")
        label_of = {n: i + 1 for i, n in enumerate(CITYSCAPES_CLASSES)}
        records = []
        for ann in sorted(gt_dir.glob("*/*_gtFine_polygons.json")):
            stem = ann.name.removesuffix("_gtFine_polygons.json")
            file = root / "leftImg8bit" / split / ann.parent.name / f"{stem}_leftImg8bit.png"
            if not file.is_file():
                problems.add("missing image", file, "image file not found, image skipped")
                continue
            try:
                data = json.loads(ann.read_text())
                height, width = int(data["imgHeight"]), int(data["imgWidth"])
                objects = data["objects"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                problems.add("bad annotation", ann, f"{type(exc).__name__}: {exc}, image skipped")
                continue
            boxes, labels, ignore, ignore_labels = [], [], [], []
            for obj in objects:
                label = str(obj.get("label", ""))
                base = label.removesuffix("group")
                if base not in label_of:
                    continue  # stuff classes (road, sky, ...) are not objects
                pts = obj.get("polygon") or []
                if len(pts) < 2:
                    problems.add("degenerate polygon", ann, f"{label} polygon with {len(pts)} points, skipped")
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                box = [min(xs), min(ys), max(xs) + 1, max(ys) + 1]  # pixel indices -> xyxy edges
                if label.endswith("group"):
                    ignore.append(box)
                    ignore_labels.append(label_of[base])
                else:
                    boxes.append(box)
                    labels.append(label_of[base])
            key = f"{ann.parent.name}/{stem}"
            records.append(
                make_record(
                    image_id=stable_image_id(key),
                    file=file,
                    height=height,
                    width=width,
                    boxes=boxes,
                    labels=labels,
                    ignore=ignore,
                    ignore_labels=ignore_labels,
                    problems=problems,
                    report_file=ann,
                )
            )
        super().__init__(records, list(CITYSCAPES_CLASSES), problems)
