"""Strict JSON for every file detkd writes: non-finite numbers become ``null``.

Python's ``json`` writes bare ``NaN`` / ``Infinity`` by default, which strict parsers (JavaScript,
jq, most other languages) reject. A metric that nothing defines (COCO's APs on a data set without
small objects) is NaN in memory and ``null`` on disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` with NaN / +-inf floats replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / torch scalars and arrays
        return finite_or_none(obj.tolist())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes null for non-finite numbers and refuses to write anything else invalid."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
