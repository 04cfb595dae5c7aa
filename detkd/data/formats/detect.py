"""Recognise a data set's format from its layout and open one split of it."""

from __future__ import annotations

from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource
from detkd.errors import DataError


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return "coco"
    if not path.is_dir():
        raise DataError(f"{path}: no such data set directory or annotation file")
    if (path / "annotations").is_dir() and any((path / "annotations").glob("*.json")):
        return "coco"
    if (path / "Annotations").is_dir() and (path / "ImageSets").is_dir():
        return "voc"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "yolo"
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        return "cityscapes"
    if (path / "training" / "label_2").is_dir():
        return "kitti"
    raise DataError(
        f"{path}: cannot tell the data format; looked for annotations/*.json (COCO), Annotations/ + ImageSets/ "
        "(VOC), images/ + labels/ (YOLO), leftImg8bit/ + gtFine/ (Cityscapes), training/label_2/ (KITTI); "
        "pass --format"
    )


def coco_annotation_file(root: Path, split: str) -> Path:
    ann = root / "annotations"
    for cand in (ann / f"{split}.json", *sorted(ann.glob(f"instances_{split}*.json"))):
        if cand.is_file():
            return cand
    raise DataError(f"{ann}: no annotation file for split {split!r} ({split}.json or instances_{split}*.json)")


def open_source(path: str | Path, *, format: str | None = None, split: str = "train", **kwargs) -> DetectionSource:
    import detkd.data.formats  # noqa: F401  (registers every reader)

    path = Path(path)
    fmt = format or detect_format(path)
    cls = FORMATS.get(fmt)
    if fmt == "coco":
        ann = path if path.is_file() else coco_annotation_file(path, split)
        return cls(ann, **kwargs)
    return cls(path, split=split, **kwargs)
