"""Cityscapes gtFine polygons of the 8 instance classes -> boxes; ``*group`` labels -> ignore regions."""

from __future__ import annotations

import json
from pathlib import Path

from detkd.data.formats.base import (
    DetectionSource,
    ImageObjects,
    Layout,
    checked_size,
    read_annotation_text,
    register_format,
    stable_image_id,
)
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

CITYSCAPES_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def _has_images_and_gt(root: Path) -> bool:
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


@register_format("cityscapes")
class CityscapesSource(DetectionSource):
    """``root/gtFine/{split}/{city}/*_gtFine_polygons.json`` + ``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png``.

    Labels other than the 8 instance classes and their groups are stuff (road, sky, ...) and are
    passed over silently. Image ids hash ``city/stem``.
    """

    title = "Cityscapes"
    layouts = (Layout(description="leftImg8bit/ + gtFine/ (Cityscapes)", matches=_has_images_and_gt, priority=40),)

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        gt = path / "gtFine"
        return sorted(d.name for d in gt.iterdir() if d.is_dir()) if gt.is_dir() else []

    def __init__(self, root: str | Path, split: str = "train") -> None:
        root = Path(root)
        problems = ProblemLog()
        gt_dir = root / "gtFine" / split
        if not gt_dir.is_dir():
            raise DataError(f"{gt_dir}: split folder not found")
        # Not ClassLabels: stuff labels (road, sky, ...) are passed over, not counted as unknown.
        label_of = {n: i + 1 for i, n in enumerate(CITYSCAPES_CLASSES)}
        records = []
        for ann in sorted(gt_dir.glob("*/*_gtFine_polygons.json")):
            stem = ann.name.removesuffix("_gtFine_polygons.json")
            city = ann.parent.name
            height, width, polygons = _load_polygons(ann)
            file = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            size = checked_size(file, height=height, width=width, problems=problems, report_file=ann)
            if size is None:
                continue
            objects = ImageObjects()
            for i, obj in enumerate(polygons):
                label = str(obj.get("label", "")) if isinstance(obj, dict) else ""
                base = label.removesuffix("group")
                if base not in label_of or obj.get("deleted"):
                    continue  # stuff classes are not objects
                box = _polygon_box(obj.get("polygon"))
                if box is None:
                    problems.add("malformed polygon", ann, f"object {i} ({label}): polygon {obj.get('polygon')!r:.60}")
                    continue
                # A *group is a crowd of instances not outlined one by one.
                objects.add(box, label_of[base], ignore=label.endswith("group"))
            image_id = stable_image_id(f"{city}/{stem}")
            records.append(objects.record(image_id=image_id, file=file, size=size, problems=problems, report_file=ann))
        super().__init__(records, list(CITYSCAPES_CLASSES), problems)


def _load_polygons(path: Path) -> tuple[int, int, list]:
    try:
        data = json.loads(read_annotation_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed json ({exc})") from None
    try:
        height, width, objects = int(data["imgHeight"]), int(data["imgWidth"]), data["objects"]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: not a Cityscapes polygons file (needs imgHeight, imgWidth, objects)") from None
    if not isinstance(objects, list):
        raise DataError(f"{path}: 'objects' is not a list")
    return height, width, objects


def _polygon_box(points: object) -> list[float] | None:
    """Enclosing xyxy box of a polygon, None when malformed.

    Vertices are integer pixel indices and the evaluation rasterises every pixel they enclose,
    so the box runs to the far edge of the last pixel (+1), as detectron2's loader does.
    """
    if not isinstance(points, list) or len(points) < 2:
        return None
    try:
        xs = [float(p[0]) for p in points]
        ys = [float(p[1]) for p in points]
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]
