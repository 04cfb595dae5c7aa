"""``detkd data inspect``: what a data set holds and every problem in it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from detkd.data.formats.base import DetectionSource
from detkd.data.formats.detect import detect_format, list_splits, open_source
from detkd.data.formats.voc import MALFORMED_FILE
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

# Image sizes are listed one by one up to this many distinct sizes, else summarised as min/max.
MAX_LISTED_SIZES = 5


@dataclass
class SplitReport:
    name: str
    images: int
    boxes_per_class: dict[str, int]  # every class, zero counts included
    boxes_per_image: tuple[int, float, int]  # min, mean, max
    ignore_regions: int
    sizes: Counter  # (width, height) -> number of images
    problems: ProblemLog
    decode_failures: list[str] = field(default_factory=list)  # "file: reason", one per unreadable image

    @property
    def num_boxes(self) -> int:
        return sum(self.boxes_per_class.values())

    @property
    def num_problems(self) -> int:
        return len(self.problems) + len(self.decode_failures)


@dataclass
class InspectReport:
    path: str
    format: str
    class_names: list[str]
    splits: list[SplitReport]
    missing_splits: list[str]  # "split: why it could not be read"

    @property
    def num_problems(self) -> int:
        return sum(s.num_problems for s in self.splits)

    def unreadable_annotations(self) -> list[str]:
        """What makes ``data inspect`` fail: splits that could not be read, annotation files that
        could not be parsed (their images skipped). Box-level problems and bad images do not."""
        found = [f"split {m}" for m in self.missing_splits]
        for s in self.splits:
            n = s.problems.counts.get(MALFORMED_FILE, 0)
            if n:
                found.append(f"split {s.name}: {n} x {MALFORMED_FILE}")
        return found


def inspect_dataset(
    path: str | Path, *, format: str | None = None, splits: list[str] | None = None, decode: bool = True
) -> InspectReport:
    """Read every split (``splits``, or all found on disk) and summarise it; ``decode`` also decodes
    every image, so a corrupt file is reported here rather than in the middle of training.

    A split that is absent or fails to parse is listed in ``missing_splits`` with the reason; only
    when no split at all can be read is that a DataError.
    """
    path = Path(path)
    fmt = format or detect_format(path)
    wanted = list(splits) if splits else list_splits(path, fmt)
    reports, missing, names = [], [], []
    for split in wanted:
        try:
            source = open_source(path, format=fmt, split=split)
        except DataError as exc:
            missing.append(f"{split}: {exc}")
            continue
        names = source.class_names
        reports.append(_split_report(split, source, decode=decode))
    if not reports:
        why = "; ".join(missing) if missing else "no splits found"
        raise DataError(f"{path}: no split could be read as {fmt} ({why})")
    return InspectReport(path=str(path), format=fmt, class_names=names, splits=reports, missing_splits=missing)


def _split_report(name: str, source: DetectionSource, *, decode: bool) -> SplitReport:
    per_class = Counter({n: 0 for n in source.class_names})
    counts, sizes, ignore = [], Counter(), 0
    for r in source.records:
        counts.append(len(r.labels))
        ignore += len(r.ignore)
        sizes[(r.width, r.height)] += 1
        per_class.update(source.class_names[lab - 1] for lab in r.labels.tolist())
    failures = []
    if decode:
        for i in range(len(source)):
            try:
                source.load(i)  # decodes and checks the decoded size against the record
            except DataError as exc:
                failures.append(str(exc))
    stats = (min(counts), sum(counts) / len(counts), max(counts)) if counts else (0, 0.0, 0)
    return SplitReport(
        name=name,
        images=len(source),
        boxes_per_class=dict(per_class),
        boxes_per_image=stats,
        ignore_regions=ignore,
        sizes=sizes,
        problems=source.problems,
        decode_failures=failures,
    )


def format_report(report: InspectReport) -> str:
    """The report as text for the terminal."""
    lines = [
        f"{report.path}: format {report.format}, {len(report.class_names)} classes: {', '.join(report.class_names)}"
    ]
    for s in report.splits:
        lo, mean, hi = s.boxes_per_image
        lines.append(f"\nsplit {s.name}: {s.images} images, {s.num_boxes} boxes, {s.ignore_regions} ignore regions")
        lines.append("  boxes per class: " + ", ".join(f"{k} {v}" for k, v in s.boxes_per_class.items()))
        lines.append(f"  boxes per image: min {lo}, mean {mean:.2f}, max {hi}")
        lines.append(f"  image sizes (WxH): {_sizes_text(s.sizes)}")
        lines.append(f"  problems: {s.num_problems}")
        if len(s.problems):
            lines += ["    " + ln for ln in s.problems.summary().splitlines()]
        if s.decode_failures:
            lines.append(f"    {len(s.decode_failures)} x unreadable image")
            lines += [f"      {f}" for f in s.decode_failures]
    for m in report.missing_splits:
        lines.append(f"\nsplit not read: {m}")
    return "\n".join(lines)


def _sizes_text(sizes: Counter) -> str:
    if not sizes:
        return "none"
    if len(sizes) <= MAX_LISTED_SIZES:
        return ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items()))
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    return f"{len(sizes)} distinct, width {min(ws)}..{max(ws)}, height {min(hs)}..{max(hs)}"
