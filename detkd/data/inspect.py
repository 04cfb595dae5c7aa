"""``detkd data inspect``: what a data set holds and every problem in it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from detkd.data.formats.detect import detect_format, open_source
from detkd.data.images import read_image
from detkd.data.sample import ProblemLog
from detkd.errors import DataError

CANDIDATE_SPLITS = ("train", "val", "test", "trainval")


@dataclass
class SplitReport:
    name: str
    images: int
    boxes_per_class: dict[str, int]
    boxes_per_image: tuple[int, float, int]  # min, mean, max
    ignore_regions: int
    sizes: Counter
    problems: ProblemLog
    decode_failures: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    path: str
    format: str
    class_names: list[str]
    splits: list[SplitReport]
    missing_splits: list[str]


def inspect_dataset(
    path: str | Path, *, format: str | None = None, splits: list[str] | None = None, decode: bool = True
) -> InspectReport:
    path = Path(path)
    fmt = format or detect_format(path)
    wanted = splits or ([None] if fmt == "coco" and path.is_file() else list(CANDIDATE_SPLITS))
    reports, missing, names = [], [], []
    for split in wanted:
        try:
            source = open_source(path, format=fmt, split=split or "train")
        except DataError as exc:
            if splits:  # the user asked for this split: its absence is the problem
                raise
            missing.append(f"{split}: {exc}")
            continue
        names = source.class_names
        reports.append(_split_report(split or path.stem, source, decode))
    if not reports:
        raise DataError(f"{path}: no split could be read ({'; '.join(missing)})")
    return InspectReport(str(path), fmt, names, reports, missing)


def _split_report(name: str, source, decode: bool) -> SplitReport:
    per_class: Counter = Counter()
    counts, sizes, ignore = [], Counter(), 0
    for r in source.records:
        counts.append(len(r.labels))
        ignore += len(r.ignore)
        sizes[(r.width, r.height)] += 1
        for lab in r.labels.tolist():
            per_class[source.class_names[lab - 1]] += 1
    failures = []
    if decode:
        for r in source.records:
            try:
                img = read_image(r.file)
            except DataError as exc:
                failures.append(str(exc))
                continue
            if tuple(img.shape[1:]) != (r.height, r.width):
                failures.append(
                    f"{r.file}: image is {img.shape[2]}x{img.shape[1]}, annotation says {r.width}x{r.height}"
                )
    stats = (min(counts), sum(counts) / len(counts), max(counts)) if counts else (0, 0.0, 0)
    return SplitReport(name, len(source), dict(per_class), stats, ignore, sizes, source.problems, failures)


def format_report(report: InspectReport) -> str:
    lines = [
        f"{report.path}: format {report.format}, {len(report.class_names)} classes: {', '.join(report.class_names)}"
    ]
    for s in report.splits:
        lo, mean, hi = s.boxes_per_image
        lines.append(
            f"\nsplit {s.name}: {s.images} images, {sum(s.boxes_per_class.values())} boxes, "
            f"{s.ignore_regions} ignore regions"
        )
        lines.append("  boxes per class: " + ", ".join(f"{k} {v}" for k, v in sorted(s.boxes_per_class.items())))
        lines.append(f"  boxes per image: min {lo}, mean {mean:.2f}, max {hi}")
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in s.sizes.most_common(5))
        lines.append(f"  image sizes (WxH): {len(s.sizes)} distinct; most common {common}")
        n_problems = len(s.problems) + len(s.decode_failures)
        lines.append(f"  problems: {n_problems}")
        if len(s.problems):
            lines += ["    " + ln for ln in s.problems.summary().splitlines()]
        lines += [f"    unreadable image: {f}" for f in s.decode_failures]
    for m in report.missing_splits:
        lines.append(f"\n(no split {m})")
    return "\n".join(lines)
