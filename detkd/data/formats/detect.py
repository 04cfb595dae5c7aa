"""Recognise a data set's format from its layout, list its splits, and open one split of it."""

from __future__ import annotations

from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource
from detkd.errors import ConfigError, DataError

LAYOUTS = (
    "a COCO .json file or annotations/*.json (COCO)",
    "Annotations/ + ImageSets/Main/ (VOC)",
    "images/ + labels/ (YOLO)",
    "leftImg8bit/ + gtFine/ (Cityscapes)",
    "training/label_2/ (KITTI)",
)


def detect_format(path: str | Path) -> str:
    """The format name (a key of FORMATS) of a data set directory or annotation file."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise DataError(f"{path}: a file, but not a COCO .json; pass a data set directory or a COCO annotation file")
    if not path.is_dir():
        raise DataError(f"{path}: no such data set directory or annotation file")
    if (path / "annotations").is_dir() and any((path / "annotations").glob("*.json")):
        return "coco"
    if (path / "Annotations").is_dir() and (path / "ImageSets" / "Main").is_dir():
        return "voc"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "yolo"
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        return "cityscapes"
    if (path / "training" / "label_2").is_dir():
        return "kitti"
    raise DataError(f"{path}: cannot tell the data format; looked for {'; '.join(LAYOUTS)}. Pass --format")


def list_splits(path: str | Path, format: str) -> list[str]:
    """Split names present on disk (sorted), as ``open_source(split=...)`` takes them."""
    path = Path(path)
    if format == "coco":
        if path.is_file():
            return [path.stem]
        files = sorted((path / "annotations").glob("*.json"))
        instances = [f.stem.removeprefix("instances_") for f in files if f.stem.startswith("instances_")]
        return instances or [f.stem for f in files]
    if format == "voc":
        # Class files (aeroplane_train.txt) hold per-class flags, not splits.
        return sorted(f.stem for f in (path / "ImageSets" / "Main").glob("*.txt") if "_" not in f.stem)
    if format == "yolo":
        return sorted(d.name for d in (path / "images").iterdir() if d.is_dir()) if (path / "images").is_dir() else []
    if format == "cityscapes":
        gt = path / "gtFine"
        return sorted(d.name for d in gt.iterdir() if d.is_dir()) if gt.is_dir() else []
    if format == "kitti":
        listed = sorted(f.stem for f in (path / "ImageSets").glob("*.txt"))
        return listed or ["all"]
    raise ConfigError(f"format: unknown data format {format!r}; available: {', '.join(FORMATS.names())}")


def coco_annotation_file(root: Path, split: str) -> Path:
    """``annotations/{split}.json``, else ``annotations/instances_{split}*.json`` (e.g. train -> train2017)."""
    ann = root / "annotations"
    for cand in (ann / f"{split}.json", *sorted(ann.glob(f"instances_{split}*.json"))):
        if cand.is_file():
            return cand
    raise DataError(f"{ann}: no annotation file for split {split!r} ({split}.json or instances_{split}*.json)")


def open_source(path: str | Path, *, format: str | None = None, split: str = "train", **kwargs) -> DetectionSource:
    """One split of the data set at ``path``; ``kwargs`` go to the reader (e.g. ``image_dir=``, ``names=``).

    ``split`` is ignored for a COCO json file; for a COCO directory it picks the annotation file.
    """
    import detkd.data.formats  # noqa: F401  (registers every reader)

    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"format: unknown data format {fmt!r}; available: {', '.join(FORMATS.names())}")
    cls = FORMATS.get(fmt)
    if fmt == "coco":
        ann = path if path.is_file() else coco_annotation_file(path, split)
        return cls(ann, **kwargs)
    return cls(path, split=split, **kwargs)
