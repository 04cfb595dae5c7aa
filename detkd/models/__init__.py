"""Detectors over torchvision: families (registry ``DETECTORS``), specs, the Detector wrapper.

Names here resolve on first use, so ``detkd.models.defaults`` (read by the recipe schema)
imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detkd.models.builders import DetectorSpec, build_detector
    from detkd.models.detector import Detector
    from detkd.models.families import DETECTORS, DetectorFamily, register_family

_HOME = {
    "DETECTORS": "detkd.models.families",
    "Detector": "detkd.models.detector",
    "DetectorFamily": "detkd.models.families",
    "DetectorSpec": "detkd.models.builders",
    "build_detector": "detkd.models.builders",
    "register_family": "detkd.models.families",
}
__all__ = ["DETECTORS", "Detector", "DetectorFamily", "DetectorSpec", "build_detector", "register_family"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
