"""Pascal VOC xml; ``difficult`` objects become ignore regions.

Two layouts are read:

- standard: ``Annotations/*.xml``, images in ``JPEGImages/``, splits in ``ImageSets/Main/{split}.txt``;
- flat: the xml files and their images side by side in one directory.

Without split files (the flat layout, or ``Annotations/`` + ``JPEGImages/`` with no ``ImageSets/Main/``)
the split is generated: an image goes to ``val`` when the SHA-256 of ``"{SPLIT_SEED}:{file stem}"``,
read as a number in [0, 1), is at least ``TRAIN_FRACTION`` (0.8), else to ``train`` (80/20); the
``trainval`` split is all of them. It depends only on the file stems, so it is the same on every
machine, in every run, and adding images never moves the others. (If a data set of two or more
images would leave a split empty, the image with the highest hash value goes to ``val``.)
"""

from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from detkd.data.formats.base import (
    IMAGE_SUFFIXES,
    ClassLabels,
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

__all__ = ["VocSource", "stable_image_id", "IMAGE_SUFFIXES", "read_split_file", "voc_layout", "generated_split"]

log = logging.getLogger(__name__)

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
GENERATED_SPLITS = ("train", "val", "trainval")

# The problem kind of an annotation file that could not be read or parsed (its image is skipped).
MALFORMED_FILE = "malformed annotation file"


@dataclass
class _Object:
    name: str
    box: list[float] | None  # VOC pixel indices (1-based, inclusive); None when malformed
    difficult: bool


@dataclass
class _Annotation:
    file_name: str | None
    height: int | None
    width: int | None
    objects: list[_Object]


@register_format("voc")
class VocSource(DetectionSource):
    """``root/Annotations/*.xml``, ``root/JPEGImages/*``, ``root/ImageSets/Main/{split}.txt``, or the
    flat layout with a generated split (see the module docstring).

    Class names are the given list, or else every object name found in the data set's xml files
    (all of them, not this split's only, so every split gets the same labels), sorted.
    """

    title = "VOC"
    layouts = (
        # Split files or not: VOC generates the split without them.
        Layout(description="Annotations/ (VOC)", matches=lambda root: (root / "Annotations").is_dir(), priority=20),
        # Last of all: stray .xml files must not take a data set of another format.
        Layout(
            description="*.xml beside the images (flat VOC)", matches=lambda root: any(root.glob("*.xml")), priority=90
        ),
    )
    names_keyword = "class_names"

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        split_dir = voc_layout(path)[2]
        if split_dir is None:
            return ["train", "val"]  # generated from the file names (module docstring)
        # Class files (aeroplane_train.txt) hold per-class flags, not splits.
        return sorted(f.stem for f in split_dir.glob("*.txt") if "_" not in f.stem)

    def __init__(self, root: str | Path, split: str = "train", class_names: list[str] | None = None) -> None:
        root = Path(root)
        problems = ProblemLog()
        ann_dir, image_dir, split_dir = voc_layout(root)
        stems = read_split_file(split_dir / f"{split}.txt") if split_dir else generated_split(ann_dir, split)
        # One unreadable xml costs its image only (counted, reported by name), as a corrupt image does.
        parsed: dict[str, _Annotation | DataError | None] = {}
        for stem in stems:
            xml = ann_dir / f"{stem}.xml"
            parsed[stem] = _try_parse(xml) if xml.is_file() else None
        if class_names is None:
            names: set[str] = set()
            for xml in sorted(ann_dir.glob("*.xml")):
                ann = parsed.get(xml.stem) or _try_parse(xml)
                if isinstance(ann, _Annotation):  # a bad file is reported by the split that lists it
                    names.update(o.name for o in ann.objects if o.name)
            class_names = sorted(names)
        classes = ClassLabels(
            class_names, problems=problems, unknown=lambda name: f"class {name!r} not in {class_names}"
        )

        records = []
        for stem, ann in parsed.items():
            xml = ann_dir / f"{stem}.xml"
            if ann is None:
                problems.add("missing annotation", xml, f"listed in {split}.txt but not found, image skipped")
                continue
            if isinstance(ann, DataError):
                reason = str(ann).removeprefix(f"{xml}: ")
                problems.add(MALFORMED_FILE, xml, f"{reason}, image skipped")
                continue
            file = _find_image(image_dir, stem, ann.file_name)
            size = checked_size(file, height=ann.height, width=ann.width, problems=problems, report_file=xml)
            if size is None:
                continue
            objects = ImageObjects()
            for i, obj in enumerate(ann.objects):
                label = classes.get(obj.name, where=f"object {i}", file=xml)
                if label is None:
                    continue
                if obj.box is None:
                    problems.add("malformed box", xml, f"object {i} ({obj.name}): malformed <bndbox>, skipped")
                    continue
                x1, y1, x2, y2 = obj.box
                # xmax <= xmin is a click without a drag (BCCD has some): an annotation slip, not a 1-pixel object.
                if x2 <= x1 or y2 <= y1:
                    problems.add("empty box", xml, f"object {i} ({obj.name}): box {obj.box} has zero size, skipped")
                    continue
                # 1-based inclusive pixel indices -> 0-based continuous xyxy.
                objects.add([x1 - 1, y1 - 1, x2, y2], label, ignore=obj.difficult)
            records.append(
                objects.record(image_id=stable_image_id(stem), file=file, size=size, problems=problems, report_file=xml)
            )
        super().__init__(records, class_names, problems)


def voc_layout(root: Path) -> tuple[Path, Path, Path | None]:
    """(annotation folder, image folder, split-file folder or None for a generated split) of a VOC
    data set; the error names the piece that is missing."""
    if not root.is_dir():
        raise DataError(f"{root}: no such data set directory")
    ann_dir = root / "Annotations"
    if ann_dir.is_dir():
        image_dir = root / "JPEGImages"
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: image folder not found (the VOC layout keeps images beside Annotations/)")
        split_dir = root / "ImageSets" / "Main"
        return ann_dir, image_dir, split_dir if split_dir.is_dir() else None
    if any(root.glob("*.xml")):
        return root, root, None  # flat: xml files and images side by side
    raise DataError(
        f"{root}: no VOC annotations; looked for Annotations/*.xml with JPEGImages/ (standard layout) "
        "and for *.xml files beside their images (flat layout)"
    )


def generated_split(ann_dir: Path, split: str) -> list[str]:
    """The file stems of ``split`` (train, val or trainval) by the seeded hash of each stem (module docstring)."""
    if split not in GENERATED_SPLITS:
        raise DataError(
            f"{ann_dir}: no split files (ImageSets/Main/*.txt), so the split is generated and is one of "
            f"{', '.join(GENERATED_SPLITS)}, not {split!r}; write ImageSets/Main/{split}.txt to define it"
        )
    stems = sorted(p.stem for p in ann_dir.glob("*.xml"))
    if not stems:
        raise DataError(f"{ann_dir}: no .xml annotation files")
    value = {s: _stem_hash(s) for s in stems}
    val = {s for s in stems if value[s] >= TRAIN_FRACTION}
    if len(stems) >= 2 and (not val or len(val) == len(stems)):  # tiny sets: both splits non-empty
        val = {max(stems, key=value.__getitem__)}
    chosen = stems if split == "trainval" else [s for s in stems if (s in val) == (split == "val")]
    log.info(
        "%s: no split files; generated split %s: %d of %d images (%d%% / %d%% train / val by a seeded hash of "
        "the file stem)",
        ann_dir,
        split,
        len(chosen),
        len(stems),
        round(100 * TRAIN_FRACTION),
        round(100 * (1 - TRAIN_FRACTION)),
    )
    return chosen


def _stem_hash(stem: str) -> float:
    digest = hashlib.sha256(f"{SPLIT_SEED}:{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_split_file(path: Path) -> list[str]:
    """Image ids of a split file, first token of each line (class files hold ``id  1``), no repeats."""
    if not path.is_file():
        present = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)
        hint = f" (split files present: {', '.join(present)})" if present else ""
        raise DataError(f"{path}: split file not found{hint}")
    text = read_annotation_text(path, allow_empty=True)
    return list(dict.fromkeys(ln.split()[0] for ln in text.splitlines() if ln.strip()))


def _find_image(folder: Path, stem: str, file_name: str | None) -> Path:
    """The image of ``stem``; the xml's <filename> first (its suffix may differ), else a stem match.
    A path that does not exist is returned as the "missing image" to report."""
    if file_name and Path(file_name).stem == stem and (folder / file_name).is_file():
        return folder / file_name
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if cand.is_file():
                return cand
    return folder / f"{stem}.jpg"


def _try_parse(path: Path) -> _Annotation | DataError:
    try:
        return _parse_xml(path)
    except DataError as exc:
        return exc


def _parse_xml(path: Path) -> _Annotation:
    try:
        data = path.read_bytes()  # bytes: the xml declaration, not us, decides the encoding
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc})") from None
    if not data.strip():
        raise DataError(f"{path}: annotation file is empty")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed xml ({exc})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    size = root.find("size")
    # A missing or zero <size> (some exporters write 0) is taken from the image header instead.
    width, height = _int_or_none(size, "width"), _int_or_none(size, "height")
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            box = None
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        objects.append(_Object(name=name, box=box, difficult=difficult))
    file_name = (root.findtext("filename") or "").strip() or None
    return _Annotation(file_name=file_name, height=height, width=width, objects=objects)


def _int_or_none(element: ET.Element | None, tag: str) -> int | None:
    try:
        value = int(float(element.findtext(tag)))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if value > 0 else None
