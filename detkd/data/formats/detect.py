"""Recognise a data set's format from its layout, list its splits, and open one split of it."""

from __future__ import annotations

from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource
from detkd.errors import ConfigError, DataError

LAYOUTS = (
    "a COCO .json file or annotations/*.json (COCO)",
    "Annotations/ (VOC)",
    "images/ + labels/ (YOLO)",
    "leftImg8bit/ + gtFine/ (Cityscapes)",
    "training/label_2/ (KITTI)",
    "*.xml beside the images (flat VOC)",
)


# The reader keyword that takes class names, by format (the others read them from their annotations).
NAMES_KEYWORD = {"yolo": "names", "voc": "class_names"}


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
    if (path / "Annotations").is_dir():  # split files or not: VOC generates the split without them
        return "voc"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "yolo"
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        return "cityscapes"
    if (path / "training" / "label_2").is_dir():
        return "kitti"
    if any(path.glob("*.xml")):
        return "voc"  # the flat layout: xml files and images side by side
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
        from detkd.data.formats.voc import voc_layout

        split_dir = voc_layout(path)[2]
        if split_dir is None:
            return ["train", "val"]  # generated from the file names (voc.py)
        # Class files (aeroplane_train.txt) hold per-class flags, not splits.
        return sorted(f.stem for f in split_dir.glob("*.txt") if "_" not in f.stem)
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


def open_source(
    path: str | Path,
    *,
    format: str | None = None,
    split: str = "train",
    names: list[str] | None = None,
    **kwargs,
) -> DetectionSource:
    """One split of the data set at ``path``; ``kwargs`` go to the reader (e.g. ``image_dir=``).

    ``split`` is ignored for a COCO json file; for a COCO directory it picks the annotation file.
    ``names`` (recipe key ``data.names``): the class names of a YOLO or VOC data set, in label order.
    """
    import detkd.data.formats  # noqa: F401  (registers every reader)

    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"format: unknown data format {fmt!r}; available: {', '.join(FORMATS.names())}")
    cls = FORMATS.get(fmt)
    if names is not None:
        if fmt not in NAMES_KEYWORD:
            raise ConfigError(f"data.names: a {fmt} data set names its own classes; names are for YOLO and VOC")
        kwargs[NAMES_KEYWORD[fmt]] = list(names)
    if fmt == "coco":
        ann = path if path.is_file() else coco_annotation_file(path, split)
        return cls(ann, **kwargs)
    return cls(path, split=split, **kwargs)
