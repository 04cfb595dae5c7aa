"""Pascal VOC xml with ImageSets split files; ``difficult`` objects become ignore regions."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource, make_record
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def stable_image_id(key: str) -> int:
    """53-bit id from a file stem: the same image gets the same id whatever the split (JSON-safe)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 11


@FORMATS.register("voc")
class VocSource(DetectionSource):
    format_name = "voc"

    def __init__(self, root: str | Path, split: str = "train", class_names: list[str] | None = None) -> None:
        root = Path(root)
        problems = ProblemLog()
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"{split_file}: split file not found")
        ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
        parsed = {}
        for stem in ids:
            xml = root / "Annotations" / f"{stem}.xml"
            try:
                parsed[stem] = _parse_xml(xml)
            except DataError as exc:
                problems.add("bad annotation", xml, f"{exc}, image skipped")
        if class_names is None:  # all xml files, not only this split, so every split agrees
            names = set()
            for xml in sorted((root / "Annotations").glob("*.xml")):
                try:
                    names.update(obj[0] for obj in _parse_xml(xml)[2])
                except DataError:
                    pass
            class_names = sorted(names)
        label_of = {n: i + 1 for i, n in enumerate(class_names)}
        records, seen = [], {}
        for stem, (height, width, objects) in parsed.items():
            file = _find_image(root / "JPEGImages", stem)
            if file is None:
                problems.add("missing image", root / "JPEGImages" / stem, "image file not found, image skipped")
                continue
            boxes, labels, ignore, ignore_labels = [], [], [], []
            for name, box, difficult in objects:
                if name not in label_of:
                    problems.add("unknown category", file, f"object class {name!r} not in {class_names}, skipped")
                    continue
                if box[2] <= box[0] or box[3] <= box[1]:  # a point or a line: an annotation slip
                    problems.add("empty box", file, f"{name} box {box} has zero width or height, skipped")
                    continue
                # VOC boxes are 1-based inclusive pixel indices.
                xyxy = [box[0] - 1, box[1] - 1, box[2], box[3]]
                (ignore if difficult else boxes).append(xyxy)
                (ignore_labels if difficult else labels).append(label_of[name])
            image_id = stable_image_id(stem)
            if image_id in seen:
                raise DataError(f"{root}: images {seen[image_id]} and {stem} map to the same id")
            seen[image_id] = stem
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
        super().__init__(records, class_names, problems)


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if cand.is_file():
                return cand
    return None


def _parse_xml(path: Path) -> tuple[int, int, list[tuple[str, list[float], bool]]]:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed xml ({exc})") from None
    root = tree.getroot()
    try:
        size = root.find("size")
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: missing or malformed <size>") from None
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path}: object {name!r} has a malformed <bndbox>") from None
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
        objects.append((name, box, difficult))
    return height, width, objects
