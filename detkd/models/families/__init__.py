"""Detector families. Importing this package registers the built-in ones in ``DETECTORS``.

Adding a family: one module here with a ``DetectorFamily`` subclass decorated
``@register_family("name")``; importing this package imports every module in it.
"""

import importlib
import pkgutil

from detkd.models.families.base import (
    DETECTORS,
    DenseFamily,
    DetectorFamily,
    all_assigners,
    conv_tower,
    group_norm,
    register_family,
)

__all__ = [
    "DETECTORS",
    "DenseFamily",
    "DetectorFamily",
    "all_assigners",
    "conv_tower",
    "group_norm",
    "register_family",
]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
