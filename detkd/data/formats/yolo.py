"""YOLO txt: images/{split}/*, labels/{split}/*.txt with ``class cx cy w h`` normalised, a names file.

Class names, first found: the ``names`` argument (recipe key ``data.names``), then in the data set
directory ``data.yaml``, ``dataset.yaml``, ``config.yaml`` (a ``names:`` list or {index: name}
mapping; the public COCO128 export ships ``config.yaml``), ``classes.txt``, ``obj.names`` (one a line).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from detkd.data.formats.base import (
    IMAGE_SUFFIXES,
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

YAML_NAME_FILES = ("data.yaml", "dataset.yaml", "config.yaml")  # a ``names:`` key
TEXT_NAME_FILES = ("classes.txt", "obj.names")  # one name a line
NAME_FILES = (*YAML_NAME_FILES, *TEXT_NAME_FILES)
# config.yaml is a generic name: without a ``names`` key it is some other tool's file, not an error.
OPTIONAL_NAMES_KEY = ("config.yaml",)


def read_names(root: Path) -> list[str]:
    """Class names from the first of NAME_FILES in ``root`` that has them (see the module docstring)."""
    skipped = []
    for name in YAML_NAME_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(read_annotation_text(path)) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: invalid YAML ({exc})") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            try:
                keys = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                raise DataError(f"{path}: 'names' mapping keys must be class indices 0..K-1") from None
            if keys != list(range(len(keys))):
                raise DataError(f"{path}: 'names' mapping keys must be 0..{len(keys) - 1}, got {keys}")
            by_index = {int(k): str(v) for k, v in names.items()}
            return [by_index[k] for k in keys]
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        if name in OPTIONAL_NAMES_KEY:
            skipped.append(f"{name} has no 'names'")
            continue
        raise DataError(f"{path}: no 'names' list or mapping")
    for name in TEXT_NAME_FILES:
        path = root / name
        if path.is_file():
            return [ln.strip() for ln in read_annotation_text(path).splitlines() if ln.strip()]
    found = f" ({'; '.join(skipped)})" if skipped else ""
    raise DataError(
        f"{root}: no class names; looked for {', '.join(NAME_FILES)} in this directory{found}. "
        "Write one of them, or list the names in the recipe: data.names: [name0, name1, ...]"
    )


def _has_images_and_labels(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "labels").is_dir()


@register_format("yolo")
class YoloSource(DetectionSource):
    """``root/images/{split}/*`` with ``root/labels/{split}/*.txt`` beside them (same relative path).

    An image without a label file is a negative; a label line with a wrong field count or a class
    index out of range is counted and skipped. Sizes come from the image headers.
    """

    title = "YOLO"
    layouts = (Layout(description="images/ + labels/ (YOLO)", matches=_has_images_and_labels, priority=30),)
    names_keyword = "names"

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        images = path / "images"
        return sorted(d.name for d in images.iterdir() if d.is_dir()) if images.is_dir() else []

    def __init__(self, root: str | Path, split: str = "train", names: list[str] | None = None) -> None:
        root = Path(root)
        problems = ProblemLog()
        names = list(names) if names else read_names(root)
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: split folder not found")
        files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        records, labelled = [], set()
        for file in files:
            rel = file.relative_to(image_dir).with_suffix("")
            label_file = label_dir / rel.with_suffix(".txt")
            labelled.add(label_file)
            size = checked_size(file, height=None, width=None, problems=problems)
            if size is None:
                continue
            height, width = size
            objects = ImageObjects()
            text = read_annotation_text(label_file, allow_empty=True) if label_file.is_file() else ""
            for n, line in enumerate(text.splitlines(), 1):
                parsed = _parse_line(line, len(names))
                if isinstance(parsed, str):
                    problems.add("malformed label line", label_file, f"line {n}: {parsed}, skipped")
                    continue
                if parsed is None:
                    continue
                cls, cx, cy, w, h = parsed
                box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
                objects.add(box, cls + 1)
            image_id = stable_image_id(rel.as_posix())
            records.append(
                objects.record(image_id=image_id, file=file, size=size, problems=problems, report_file=label_file)
            )
        if label_dir.is_dir():
            for orphan in sorted(set(label_dir.rglob("*.txt")) - labelled):
                problems.add("label without image", orphan, f"no image for it in {image_dir}, skipped")
        super().__init__(records, names, problems)


def _parse_line(line: str, num_classes: int) -> tuple[int, float, float, float, float] | str | None:
    """(class, cx, cy, w, h); None for a blank line; the reason as a string when malformed."""
    parts = line.split()
    if not parts:
        return None
    if len(parts) != 5:
        return f"{len(parts)} fields, expected 5 (class cx cy w h)"
    try:
        cls_value = float(parts[0])
        cx, cy, w, h = (float(v) for v in parts[1:])
    except ValueError:
        return f"non-numeric field in {line.strip()!r}"
    if not cls_value.is_integer() or not 0 <= cls_value < num_classes:
        return f"class {parts[0]} outside 0..{num_classes - 1}"
    return int(cls_value), cx, cy, w, h
