"""What every format reader shares: records, class names, problem log, validated loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from detkd.data.images import read_image
from detkd.data.sample import ProblemLog, Record, Sample
from detkd.errors import DataError
from detkd.registry import Registry

FORMATS: Registry[type[DetectionSource]] = Registry("data format")

# A box may overhang the image by this many pixels (annotation rounding) before it counts as a problem.
EDGE_TOLERANCE = 2.0


class DetectionSource:
    """A parsed data set split: ``records[i]`` annotations, images decoded on demand.

    Readers parse all annotations in ``__init__`` and put every problem in ``problems``:
    fatal ones (unreadable annotation file) raise DataError naming the file.
    """

    format_name = "base"

    def __init__(self, records: list[Record], class_names: list[str], problems: ProblemLog | None = None):
        self.records = records
        self.class_names = list(class_names)
        self.problems = problems if problems is not None else ProblemLog()

    @property
    def num_classes(self) -> int:
        """Number of object classes K (labels are 1..K)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        """sha256 over every record (id, file name, size, boxes, labels): a store built on other data
        (or another split) is refused."""
        h = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.image_id):
            h.update(f"{r.image_id}|{Path(r.file).name}|{r.height}|{r.width}|".encode())
            h.update(r.boxes.to(torch.float32).contiguous().numpy().tobytes())
            h.update(r.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def load(self, index: int) -> Sample:
        record = self.records[index]
        image = read_image(record.file)
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError(
                f"{record.file}: image is {image.shape[2]}x{image.shape[1]} (WxH) but its annotation "
                f"says {record.width}x{record.height}"
            )
        return Sample(image=image, record=record)


def make_record(
    *,
    image_id: int,
    file: Path,
    height: int,
    width: int,
    boxes: list[list[float]],
    labels: list[int],
    problems: ProblemLog,
    ignore: list[list[float]] = (),
    ignore_labels: list[int] = (),
    report_file: str | Path | None = None,
) -> Record:
    """A Record from plain lists: training boxes validated by ``clean_boxes`` (problems reported
    against ``report_file``, the annotation file, or the image), ignore regions kept as given."""
    b, lab = clean_boxes(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        width,
        height,
        report_file or file,
        problems,
    )
    return Record(
        image_id=image_id,
        file=file,
        height=height,
        width=width,
        boxes=b,
        labels=lab,
        ignore=torch.tensor(list(ignore), dtype=torch.float32).reshape(-1, 4),
        ignore_labels=torch.tensor(list(ignore_labels), dtype=torch.int64),
    )


def clean_boxes(
    boxes: Tensor, labels: Tensor, width: int, height: int, file: str | Path, problems: ProblemLog
) -> tuple[Tensor, Tensor]:
    """Clip boxes to the image, drop (and count) empty or outside boxes.

    Boxes overhanging by more than EDGE_TOLERANCE are clipped and counted as a problem;
    boxes of zero area after clipping are dropped and counted.
    """
    boxes = boxes.reshape(-1, 4).to(torch.float32)
    labels = labels.reshape(-1).to(torch.int64)
    if boxes.numel() == 0:
        return torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)
    finite = torch.isfinite(boxes).all(dim=1)
    for i in torch.nonzero(~finite).flatten().tolist():
        problems.add("non-finite box", file, f"box {i} has non-finite coordinates, skipped")
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    overhang = ((boxes < -EDGE_TOLERANCE) | (boxes > limit + EDGE_TOLERANCE)).any(dim=1) & finite
    for i in torch.nonzero(overhang).flatten().tolist():
        problems.add("box outside image", file, f"box {i} {boxes[i].tolist()} exceeds {width}x{height}, clipped")
    clipped = torch.stack(
        [
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ],
        dim=1,
    )
    empty = ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])) & finite
    for i in torch.nonzero(empty).flatten().tolist():
        problems.add("empty box", file, f"box {i} {boxes[i].tolist()} has zero size inside the image, skipped")
    keep = finite & ~empty
    return clipped[keep], labels[keep]
