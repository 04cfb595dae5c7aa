"""What every format reader shares: records, class names, problem log, validated loading, and the
format registry (``register_format``) that detection and ``open_source`` read."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from detkd.data.images import image_size, read_image
from detkd.data.sample import ImageRecord, ProblemLog, Sample
from detkd.errors import DataError
from detkd.registry import Registry

FORMATS: Registry[type[DetectionSource]] = Registry("data format")

# A box may overhang the image by this many pixels (annotation rounding) before it counts as a problem.
EDGE_TOLERANCE = 2.0

# Suffixes readers look for when a format names images by stem only (VOC, YOLO); compared lower-case.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Layout:
    """One on-disk layout that identifies a format.

    ``detect_format`` tries the layouts of every registered format in (priority, format name) order,
    lowest first, and the first that ``matches`` names the format. The built-in formats use 10 to 90
    (90: flat VOC, the catch-all for stray .xml files); a new format with a priority above theirs never
    takes a layout they recognise.
    """

    description: str  # what the "cannot tell the data format" error lists as looked for
    matches: Callable[[Path], bool]  # called with a directory (or, when ``file``, an annotation file)
    priority: int
    file: bool = False  # matched against an annotation file passed directly, not a data set directory


class DetectionSource:
    """A parsed data set split: ``records[i]`` annotations, images decoded on demand.

    Readers parse all annotations in ``__init__`` and put every problem in ``problems``:
    fatal ones (unreadable annotation file) raise DataError naming the file.
    """

    # Set by register_format; "base" for a plain container of records.
    format_name: ClassVar[str] = "base"
    title: ClassVar[str] = "base"  # the name in messages ("a COCO annotation file"); defaults to format_name
    layouts: ClassVar[tuple[Layout, ...]] = ()  # how detect_format recognises the format; none: by name only
    names_keyword: ClassVar[str | None] = None  # the reader keyword recipe ``data.names`` goes to; None: refused

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        """Split names present at ``path`` (sorted), as ``open_split(split=...)`` takes them."""
        return []

    @classmethod
    def open_split(cls, path: Path, *, split: str, **kwargs: Any) -> DetectionSource:
        """One split of the data set at ``path``; ``kwargs`` are reader keywords (e.g. ``image_dir=``)."""
        return cls(path, split=split, **kwargs)

    def __init__(self, records: list[ImageRecord], class_names: list[str], problems: ProblemLog | None = None):
        check_unique_ids(records)
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


Source = TypeVar("Source", bound=type[DetectionSource])


def register_format(name: str) -> Callable[[Source], Source]:
    """Class decorator: ``@register_format("coco")`` adds a reader to FORMATS and sets its ``format_name``
    (and ``title``, unless the class sets one). Its ``layouts``, ``list_splits`` and ``open_split`` are
    all that detection, ``open_source`` and ``data inspect`` need to know of it."""

    def decorator(cls: Source) -> Source:
        FORMATS.register(name)(cls)  # first: a duplicate name must leave the class untouched
        cls.format_name = name
        if "title" not in vars(cls):
            cls.title = name
        return cls

    return decorator


def stable_image_id(key: str) -> int:
    """53-bit id from a file stem or relative path: the same image gets the same id whatever the
    split, and it survives a round trip through JSON (float64 holds 53-bit integers exactly)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 11


def check_unique_ids(records: Sequence[ImageRecord]) -> None:
    """Two images with one id would silently share stored teacher knowledge and evaluation entries."""
    seen: dict[int, Path] = {}
    for r in records:
        if r.image_id in seen:
            other = seen[r.image_id]
            where = f"{r.file}: listed twice" if Path(other) == Path(r.file) else f"{other} and {r.file}: both have"
            raise DataError(f"{where} image id {r.image_id}; image ids must be unique")
        seen[r.image_id] = r.file


def read_annotation_text(path: Path, *, allow_empty: bool = False) -> str:
    """The text of an annotation file, or DataError naming it (missing, unreadable, not text, empty)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc})") from None
    if not allow_empty and not text.strip():
        raise DataError(f"{path}: annotation file is empty")
    return text


def checked_size(
    file: Path,
    *,
    height: int | None,
    width: int | None,
    problems: ProblemLog,
    report_file: str | Path | None = None,
) -> tuple[int, int] | None:
    """(height, width) to record for ``file``, or None when the image must be skipped (counted).

    The image header (not the pixels) is the truth: a missing image or one whose size disagrees
    with the annotation is skipped. When the header cannot be parsed but the annotation gives the
    size, the image is kept: ``load()`` then raises DataError naming it, and inspect reports it.
    """
    if not file.is_file():
        problems.add("missing image", file, "image file not found, image skipped")
        return None
    given = height is not None and width is not None and height > 0 and width > 0
    try:
        real = image_size(file)
    except DataError as exc:
        if given:
            return height, width
        problems.add("unreadable image", file, f"{exc}, image skipped")
        return None
    if given and real != (height, width):
        problems.add(
            "size mismatch",
            report_file or file,
            f"annotation says {width}x{height} (WxH) but {file.name} is {real[1]}x{real[0]}, image skipped",
        )
        return None
    return real


class ClassLabels:
    """A data set's class keys (names, or COCO category ids) -> contiguous labels 1..K, in the given
    order; the one check that an annotation's class is one of the data set's."""

    def __init__(self, keys: Sequence[Hashable], *, problems: ProblemLog, unknown: Callable[[Hashable], str]) -> None:
        self.label_of: dict[Hashable, int] = {k: i + 1 for i, k in enumerate(keys)}
        self.problems = problems
        self.unknown = unknown  # the reader's wording of an unknown key, e.g. "category 99, skipped"

    def get(self, key: Hashable, *, where: str, file: str | Path) -> int | None:
        """The label of ``key``; None, counted as "unknown category" (``{where}: {unknown(key)}``), when
        the key is not one of the data set's classes."""
        label = self.label_of.get(key)
        if label is None:
            self.problems.add("unknown category", file, f"{where}: {self.unknown(key)}")
        return label


@dataclass
class ImageObjects:
    """One image's annotated objects as a reader collects them: boxes to train on, and ignore regions
    (COCO crowd, VOC difficult, Cityscapes groups, KITTI DontCare), which are neither trained on nor
    counted as misses in evaluation."""

    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignore: list[list[float]] = field(default_factory=list)
    ignore_labels: list[int] = field(default_factory=list)

    def add(self, box: Sequence[float], label: int, *, ignore: bool = False) -> None:
        if ignore:
            self.ignore.append(list(box))
            self.ignore_labels.append(label)
        else:
            self.boxes.append(list(box))
            self.labels.append(label)

    def record(
        self,
        *,
        image_id: int,
        file: Path,
        size: tuple[int, int],
        problems: ProblemLog,
        report_file: str | Path | None = None,
    ) -> ImageRecord:
        """The ImageRecord of an image of ``size`` (height, width): training boxes validated by ``clean_boxes``
        (problems reported against ``report_file``, the annotation file, or the image); ignore regions
        clipped to the image and dropped when empty, silently (they only excuse detections)."""
        height, width = size
        b, lab = clean_boxes(
            torch.tensor(self.boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(self.labels, dtype=torch.int64),
            width,
            height,
            report_file or file,
            problems,
        )
        ign = torch.tensor(self.ignore, dtype=torch.float32).reshape(-1, 4)
        ign_labels = torch.tensor(self.ignore_labels, dtype=torch.int64)
        ign = _clip(ign, width, height)
        keep = (ign[:, 2] > ign[:, 0]) & (ign[:, 3] > ign[:, 1])
        return ImageRecord(
            image_id=image_id,
            file=file,
            height=height,
            width=width,
            boxes=b,
            labels=lab,
            ignore=ign[keep],
            ignore_labels=ign_labels[keep],
        )


def _clip(boxes: Tensor, width: int, height: int) -> Tensor:
    return torch.stack(
        [
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ],
        dim=1,
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
    clipped = _clip(boxes, width, height)
    empty = ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])) & finite
    for i in torch.nonzero(empty).flatten().tolist():
        problems.add("empty box", file, f"box {i} {boxes[i].tolist()} has zero size inside the image, skipped")
    keep = finite & ~empty
    return clipped[keep], labels[keep]
