"""KITTI object detection: training/image_2/*.png + training/label_2/*.txt; DontCare -> ignore."""

from __future__ import annotations

from pathlib import Path

from detkd.data.formats.base import (
    ClassLabels,
    DetectionSource,
    ImageObjects,
    Layout,
    checked_size,
    read_annotation_text,
    register_format,
    stable_image_id,
)
from detkd.data.formats.voc import read_split_file
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")
# Label of DontCare regions: they excuse detections of any class (see detkd.engine.metrics).
ANY_CLASS = 0


@register_format("kitti")
class KittiSource(DetectionSource):
    """``root/training/image_2/*.png`` + ``root/training/label_2/*.txt``.

    ``split`` names ``root/ImageSets/{split}.txt`` (one id a line). KITTI has no official split:
    without that file, ``None``, "train" and "all" mean every labelled image; other names are an error.
    Line fields: type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry [score].
    """

    title = "KITTI"
    layouts = (
        Layout(
            description="training/label_2/ (KITTI)",
            matches=lambda root: (root / "training" / "label_2").is_dir(),
            priority=50,
        ),
    )

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        return sorted(f.stem for f in (path / "ImageSets").glob("*.txt")) or ["all"]

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        root = Path(root)
        problems = ProblemLog()
        image_dir, label_dir = root / "training" / "image_2", root / "training" / "label_2"
        if not label_dir.is_dir():
            raise DataError(f"{label_dir}: KITTI label folder not found")
        split_file = root / "ImageSets" / f"{split}.txt"
        if split is not None and split_file.is_file():
            stems = read_split_file(split_file)
        elif split in (None, "train", "all"):
            stems = sorted(p.stem for p in label_dir.glob("*.txt"))
        else:
            raise DataError(f"{split_file}: split file not found (KITTI has no official {split!r} split; list ids)")
        classes = ClassLabels(KITTI_CLASSES, problems=problems, unknown=lambda name: f"class {name!r}, skipped")
        records = []
        for stem in stems:
            file = image_dir / f"{stem}.png"
            label_file = label_dir / f"{stem}.txt"
            if not label_file.is_file():
                problems.add("missing annotation", label_file, "label file not found, image skipped")
                continue
            text = read_annotation_text(label_file, allow_empty=True)  # empty: an image without objects
            size = checked_size(file, height=None, width=None, problems=problems)
            if size is None:
                continue
            objects = ImageObjects()
            for n, line in enumerate(text.splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) not in (15, 16):
                    problems.add("malformed label line", label_file, f"line {n}: {len(parts)} fields, expected 15")
                    continue
                try:
                    box = [float(v) for v in parts[4:8]]
                except ValueError:
                    problems.add("malformed label line", label_file, f"line {n}: non-numeric box {parts[4:8]}")
                    continue
                if parts[0] == "DontCare":
                    objects.add(box, ANY_CLASS, ignore=True)
                    continue
                label = classes.get(parts[0], where=f"line {n}", file=label_file)
                if label is not None:
                    objects.add(box, label)
            image_id = stable_image_id(stem)
            records.append(
                objects.record(image_id=image_id, file=file, size=size, problems=problems, report_file=label_file)
            )
        super().__init__(records, list(KITTI_CLASSES), problems)
