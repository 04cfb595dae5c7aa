"""KITTI object detection: training/image_2/*.png + training/label_2/*.txt; DontCare -> ignore."""

from __future__ import annotations

from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource, make_record
from detkd.data.formats.voc import stable_image_id
from detkd.data.images import image_size
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")


@FORMATS.register("kitti")
class KittiSource(DetectionSource):
    format_name = "kitti"

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        root = Path(root)
        problems = ProblemLog()
        image_dir, label_dir = root / "training" / "image_2", root / "training" / "label_2"
        if not label_dir.is_dir():
            raise DataError(f"{label_dir}: KITTI label folder not found")
        split_file = root / "ImageSets" / f"{split}.txt"
        if split and split_file.is_file():
            stems = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        elif split in (None, "train", "all"):  # no split file: every labelled image
            stems = sorted(p.stem for p in label_dir.glob("*.txt"))
        else:
            raise DataError(f"{split_file}: split file not found (KITTI has no official val split; list ids there)")
        label_of = {n: i + 1 for i, n in enumerate(KITTI_CLASSES)}
        records = []
        for stem in stems:
            file = image_dir / f"{stem}.png"
            label_file = label_dir / f"{stem}.txt"
            try:
                height, width = image_size(file)
            except DataError as exc:
                problems.add("unreadable image", file, f"{exc}, image skipped")
                continue
            if not label_file.is_file():
                problems.add("missing label file", label_file, "not found, image skipped")
                continue
            boxes, labels, ignore = [], [], []
            for n, line in enumerate(label_file.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) not in (15, 16):
                    problems.add("malformed label line", label_file, f"line {n}: {len(parts)} fields, expected 15")
                    continue
                try:
                    box = [float(v) for v in parts[4:8]]
                except ValueError:
                    problems.add("malformed label line", label_file, f"line {n}: non-numeric box")
                    continue
                if parts[0] == "DontCare":
                    ignore.append(box)
                elif parts[0] in label_of:
                    boxes.append(box)
                    labels.append(label_of[parts[0]])
                else:
                    problems.add("unknown category", label_file, f"line {n}: class {parts[0]!r}, skipped")
            records.append(
                make_record(
                    image_id=stable_image_id(stem),
                    file=file,
                    height=height,
                    width=width,
                    boxes=boxes,
                    labels=labels,
                    ignore=ignore,
                    ignore_labels=[0] * len(ignore),
                    problems=problems,
                    report_file=label_file,
                )
            )
        super().__init__(records, list(KITTI_CLASSES), problems)
