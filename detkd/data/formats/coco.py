"""COCO json: crowd annotations become ignore regions, category ids map to contiguous labels."""

from __future__ import annotations

import json
from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource, make_record
from detkd.data.sample import ProblemLog
from detkd.errors import DataError


@FORMATS.register("coco")
class CocoSource(DetectionSource):
    format_name = "coco"

    def __init__(self, annotation_file: str | Path, image_dir: str | Path | None = None) -> None:
        path = Path(annotation_file)
        problems = ProblemLog()
        data = _load_json(path)
        image_dir = Path(image_dir) if image_dir is not None else _default_image_dir(path)
        cats = sorted(data.get("categories") or [], key=lambda c: c["id"])
        if not cats:
            raise DataError(f"{path}: no categories")
        self.category_ids = {i + 1: int(c["id"]) for i, c in enumerate(cats)}  # label -> COCO category id
        label_of = {cid: lab for lab, cid in self.category_ids.items()}
        per_image: dict[int, list[dict]] = {}
        for ann in data.get("annotations") or []:
            per_image.setdefault(ann.get("image_id"), []).append(ann)
        records, seen = [], set()
        for img in data.get("images") or []:
            try:
                image_id, file_name = int(img["id"]), str(img["file_name"])
                height, width = int(img["height"]), int(img["width"])
            except (KeyError, TypeError, ValueError) as exc:
                problems.add("malformed image entry", path, f"image entry {img!r:.80}: {exc}, skipped")
                continue
            if image_id in seen:
                raise DataError(f"{path}: image id {image_id} appears twice")
            seen.add(image_id)
            file = image_dir / file_name
            if not file.is_file():
                problems.add("missing image", file, "image file not found, image skipped")
                continue
            boxes, labels, ignore, ignore_labels = [], [], [], []
            for ann in per_image.get(image_id, []):
                cid = ann.get("category_id")
                bbox = ann.get("bbox")
                if cid not in label_of:
                    problems.add("unknown category", path, f"annotation {ann.get('id')}: category {cid!r}, skipped")
                    continue
                if not (isinstance(bbox, list) and len(bbox) == 4):
                    problems.add("malformed box", path, f"annotation {ann.get('id')}: bbox {bbox!r}, skipped")
                    continue
                x, y, w, h = (float(v) for v in bbox)
                target = (ignore, ignore_labels) if ann.get("iscrowd", 0) else (boxes, labels)
                target[0].append([x, y, x + w, y + h])
                target[1].append(label_of[cid])
            records.append(
                make_record(
                    image_id=image_id,
                    file=file,
                    height=height,
                    width=width,
                    boxes=boxes,
                    labels=labels,
                    ignore=ignore,
                    ignore_labels=ignore_labels,
                    problems=problems,
                )
            )
        known = seen
        for image_id in per_image:
            if image_id not in known:
                problems.add("annotation without image", path, f"annotations for unknown image id {image_id!r}")
        super().__init__(records, [str(c["name"]) for c in cats], problems)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    text = path.read_text()
    if not text.strip():
        raise DataError(f"{path}: annotation file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed json ({exc})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: not a COCO annotation file (no 'images' list)")
    return data


def _default_image_dir(annotation_file: Path) -> Path:
    """COCO layouts keep images in ``images/`` beside ``annotations/``, or next to the json."""
    sibling = annotation_file.parent.parent / "images"
    return sibling if sibling.is_dir() else annotation_file.parent
