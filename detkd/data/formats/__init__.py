"""One reader per data format, all yielding detkd.data.sample.Record / Sample."""

import importlib

for _name in ("coco", "voc", "yolo", "cityscapes", "kitti"):
    try:
        importlib.import_module(f"detkd.data.formats.{_name}")
    except ModuleNotFoundError as _exc:  # a format module not written yet must not break the others
        if _exc.name != f"detkd.data.formats.{_name}":
            raise
