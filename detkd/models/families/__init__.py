"""Detector families. Importing this package registers the built-in ones in ``DETECTORS``.

Adding a family: one module here with a ``DetectorFamily`` subclass decorated
``@register_family("name")``, and its import below.
"""

from detkd.models.families import fasterrcnn, fcos, retinanet  # noqa: F401  (registration)
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
