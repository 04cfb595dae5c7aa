"""COCO json: crowd annotations become ignore regions, category ids map to contiguous labels."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from detkd.data.formats.base import (
    ClassLabels,
    DetectionSource,
    ImageObjects,
    Layout,
    checked_size,
    read_annotation_text,
    register_format,
)
from detkd.data.sample import ProblemLog
from detkd.errors import DataError


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _has_annotation_jsons(root: Path) -> bool:
    return (root / "annotations").is_dir() and any((root / "annotations").glob("*.json"))


@register_format("coco")
class CocoSource(DetectionSource):
    """One COCO instances json.

    Labels are 1..K in sorted category-id order; ``category_ids[label]`` gives the COCO id back
    (results are written in COCO ids). Image ids are the json's own. Images without annotations
    are kept as negatives.
    """

    title = "COCO"
    layouts = (
        Layout(description="a COCO .json", matches=_is_json, priority=10, file=True),
        Layout(
            description="a COCO .json file or annotations/*.json (COCO)", matches=_has_annotation_jsons, priority=10
        ),
    )

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        """A json file is its own split; in a directory, ``instances_X.json`` names split X, else each json does."""
        if path.is_file():
            return [path.stem]
        files = sorted((path / "annotations").glob("*.json"))
        instances = [f.stem.removeprefix("instances_") for f in files if f.stem.startswith("instances_")]
        return instances or [f.stem for f in files]

    @classmethod
    def open_split(cls, path: Path, *, split: str, **kwargs: Any) -> CocoSource:
        """``split`` is ignored for a json file; for a directory it picks the annotation file."""
        return cls(path if path.is_file() else coco_annotation_file(path, split), **kwargs)

    def __init__(self, annotation_file: str | Path, image_dir: str | Path | None = None) -> None:
        path = Path(annotation_file)
        problems = ProblemLog()
        data = load_coco_json(path)
        images = data["images"]
        image_dir = Path(image_dir) if image_dir is not None else default_image_dir(path, images)
        cats = _categories(path, data)
        self.category_ids: dict[int, int] = {i + 1: cid for i, (cid, _) in enumerate(cats)}
        classes = ClassLabels(
            [cid for cid, _ in cats], problems=problems, unknown=lambda cid: f"category {cid!r}, skipped"
        )

        per_image: dict[object, list[dict]] = {}
        for ann in data.get("annotations") or []:
            if not isinstance(ann, dict):
                problems.add("malformed annotation", path, f"annotation {ann!r:.60} is not an object, skipped")
                continue
            per_image.setdefault(ann.get("image_id"), []).append(ann)

        records, seen = [], set()
        for img in images:
            try:
                image_id, file_name = int(img["id"]), str(img["file_name"])
                height, width = _optional_int(img.get("height")), _optional_int(img.get("width"))
            except (KeyError, TypeError, ValueError) as exc:
                problems.add("malformed image entry", path, f"image entry {img!r:.80}: {exc!r}, skipped")
                continue
            if image_id in seen:
                raise DataError(f"{path}: image id {image_id} appears twice in 'images'")
            seen.add(image_id)
            file = image_dir / file_name
            size = checked_size(file, height=height, width=width, problems=problems, report_file=path)
            if size is None:
                continue
            objects = ImageObjects()
            for ann in per_image.get(image_id, []):
                label = classes.get(ann.get("category_id"), where=f"annotation {ann.get('id')}", file=path)
                if label is None:
                    continue
                box = _xyxy(ann.get("bbox"))
                if box is None:
                    bbox = ann.get("bbox")
                    problems.add("malformed box", path, f"annotation {ann.get('id')}: bbox {bbox!r}, skipped")
                    continue
                # Crowd regions are neither trained on nor counted as misses (COCO evaluation rule).
                objects.add(box, label, ignore=bool(ann.get("iscrowd", 0)))
            records.append(objects.record(image_id=image_id, file=file, size=size, problems=problems, report_file=path))
        for image_id in (k for k in per_image if k not in seen):
            problems.add("annotation without image", path, f"annotations for unknown image id {image_id!r}, skipped")
        super().__init__(records, [name for _, name in cats], problems)


def coco_annotation_file(root: Path, split: str) -> Path:
    """``annotations/{split}.json``, else ``annotations/instances_{split}*.json`` (e.g. train -> train2017)."""
    ann = root / "annotations"
    for cand in (ann / f"{split}.json", *sorted(ann.glob(f"instances_{split}*.json"))):
        if cand.is_file():
            return cand
    raise DataError(f"{ann}: no annotation file for split {split!r} ({split}.json or instances_{split}*.json)")


def load_coco_json(path: Path) -> dict:
    """The parsed json, checked to be a COCO detection file; DataError naming ``path`` otherwise."""
    text = read_annotation_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO annotation file (no 'images' list)")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' is not a list")
    return data


def default_image_dir(annotation_file: Path, images: list) -> Path:
    """Where the ``file_name``s live: the first usual place that holds the first image.

    ``root/annotations/X.json`` looks in root/images, root/images/X, root/X (COCO 2017's
    ``train2017/``) and root; a json elsewhere looks beside itself (``images/``, X/, the folder).
    """
    split = annotation_file.stem.removeprefix("instances_")
    base = annotation_file.parent
    if base.name == "annotations":
        root = base.parent
        candidates = [root / "images", root / "images" / split, root / split, root]
    else:
        candidates = [base / "images", base / "images" / split, base / split, base]
    first = next((str(i["file_name"]) for i in images if isinstance(i, dict) and "file_name" in i), None)
    if first is not None:
        for cand in candidates:
            if (cand / first).is_file():
                return cand
    return next((c for c in candidates if c.is_dir()), base)


def _categories(path: Path, data: dict) -> list[tuple[int, str]]:
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{path}: no 'categories' list")
    out: dict[int, str] = {}
    for c in cats:
        try:
            cid, name = int(c["id"]), str(c["name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: category {c!r:.80} needs an integer 'id' and a 'name'") from None
        if cid in out:
            raise DataError(f"{path}: category id {cid} appears twice")
        out[cid] = name
    return sorted(out.items())


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)


def _xyxy(bbox: object) -> list[float] | None:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]; None when it is not four finite numbers."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    return [x, y, x + w, y + h]
