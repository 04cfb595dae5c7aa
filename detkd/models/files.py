"""Reading weight files without executing code, and naming them by content.

Shared by detector checkpoints (``detkd.models.checkpoint``) and backbone weights
(``detkd.models.pretrained``): ``torch.load(weights_only=True)`` accepts tensors and plain
containers only; anything else is refused in one line that says what the file holds.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refusal(message: str) -> str:
    """torch's weights-only error, said in one line: what was found and why it is refused."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found:
        what = f"a reference to {found.group(1)}"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        what = f"pickle data that is not plain ({detail.group(1).strip() if detail else 'unsupported'})"
    return (
        f"refusing to unpickle arbitrary objects: the file holds {what}, not only tensors and plain data "
        "(loading it could run code; detkd loads weights only)"
    )
