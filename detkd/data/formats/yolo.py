"""YOLO txt: images/{split}/*, labels/{split}/*.txt with ``class cx cy w h`` normalised, a names file."""

from __future__ import annotations

from pathlib import Path

import yaml

from detkd.data.formats.base import FORMATS, DetectionSource, make_record
from detkd.data.formats.voc import IMAGE_SUFFIXES, stable_image_id
from detkd.data.images import image_size
from detkd.data.sample import ProblemLog
from detkd.errors import DataError


def read_names(root: Path) -> list[str]:
    for name in ("data.yaml", "dataset.yaml"):
        path = root / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise DataError(f"{path}: invalid YAML ({exc})") from None
            names = data.get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise DataError(f"{path}: no 'names' list or mapping")
    for name in ("classes.txt", "obj.names"):
        path = root / name
        if path.is_file():
            return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    raise DataError(f"{root}: no class names (data.yaml with 'names', classes.txt or obj.names)")


@FORMATS.register("yolo")
class YoloSource(DetectionSource):
    format_name = "yolo"

    def __init__(self, root: str | Path, split: str = "train", names: list[str] | None = None) -> None:
        root = Path(root)
        problems = ProblemLog()
        names = names or read_names(root)
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: split folder not found")
        records = []
        for file in sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                height, width = image_size(file)
            except DataError as exc:
                problems.add("unreadable image", file, f"{exc}, image skipped")
                continue
            rel = file.relative_to(image_dir).with_suffix(".txt")
            boxes, labels = [], []
            label_file = label_dir / rel
            lines = label_file.read_text().splitlines() if label_file.is_file() else []  # no file: a negative
            for n, line in enumerate(lines, 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) != 5:
                        raise ValueError(f"{len(parts)} fields, expected 5")
                    cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:])
                    if not 0 <= cls < len(names):
                        raise ValueError(f"class {cls} outside 0..{len(names) - 1}")
                except ValueError as exc:
                    problems.add("malformed label line", label_file, f"line {n}: {exc}, skipped")
                    continue
                boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
                labels.append(cls + 1)
            image_id = stable_image_id(str(rel.with_suffix("")))
            records.append(
                make_record(
                    image_id=image_id,
                    file=file,
                    height=height,
                    width=width,
                    boxes=boxes,
                    labels=labels,
                    problems=problems,
                    report_file=label_file,
                )
            )
        super().__init__(records, names, problems)
