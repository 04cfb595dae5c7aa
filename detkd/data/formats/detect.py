"""Recognise a data set's format from its layout, list its splits, and open one split of it.

Nothing here names a format: each reader registers itself (``base.register_format``) with the
layouts it is recognised by, and importing this module imports every built-in reader.
"""

from __future__ import annotations

from pathlib import Path

from detkd.data.formats.base import FORMATS, DetectionSource, Layout
from detkd.errors import ConfigError, DataError


def format_reader(name: str) -> type[DetectionSource]:
    """The reader registered as ``name``; ConfigError listing the registered formats otherwise."""
    if name not in FORMATS:
        raise ConfigError(f"format: unknown data format {name!r}; available: {', '.join(FORMATS.names())}")
    return FORMATS.get(name)


def layouts(*, file: bool) -> list[tuple[str, Layout]]:
    """(format name, layout) of every registered format's file (or directory) layouts, in the order
    ``detect_format`` tries them: by priority, then format name (a stable sort, so one format's
    layouts of equal priority keep their declared order)."""
    found = [(name, layout) for name, cls in FORMATS.items() for layout in cls.layouts if layout.file == file]
    return sorted(found, key=lambda item: (item[1].priority, item[0]))


def detect_format(path: str | Path) -> str:
    """The format name (a key of FORMATS) of a data set directory or annotation file."""
    path = Path(path)
    if path.is_file():
        candidates = layouts(file=True)
        for name, layout in candidates:
            if layout.matches(path):
                return name
        wanted = " or ".join(layout.description for _, layout in candidates) or "an annotation file"
        titles = dict.fromkeys(FORMATS.get(name).title for name, _ in candidates)
        files = " or ".join(f"a {title} annotation file" for title in titles) or "an annotation file"
        raise DataError(f"{path}: a file, but not {wanted}; pass a data set directory or {files}")
    if not path.is_dir():
        raise DataError(f"{path}: no such data set directory or annotation file")
    candidates = layouts(file=False)
    for name, layout in candidates:
        if layout.matches(path):
            return name
    looked_for = "; ".join(layout.description for _, layout in candidates)
    raise DataError(f"{path}: cannot tell the data format; looked for {looked_for}. Pass --format")


def list_splits(path: str | Path, format: str) -> list[str]:
    """Split names present on disk (sorted), as ``open_source(split=...)`` takes them."""
    return format_reader(format).list_splits(Path(path))


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
    path = Path(path)
    fmt = format or detect_format(path)
    reader = format_reader(fmt)
    if names is not None:
        if reader.names_keyword is None:
            takers = " and ".join(cls.title for _, cls in FORMATS.items() if cls.names_keyword is not None)
            raise ConfigError(f"data.names: a {fmt} data set names its own classes; names are for {takers}")
        kwargs[reader.names_keyword] = list(names)
    return reader.open_split(path, split=split, **kwargs)
