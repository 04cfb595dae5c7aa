"""Reading weight files without executing code, and naming them by content.

Shared by detector checkpoints (``detkd.models.checkpoint``) and backbone weights
(``detkd.models.pretrained``): ``torch.load(weights_only=True)`` accepts tensors and plain
containers only; anything else is refused in one line that says what the file holds.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from detkd.errors import DetkdError


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


def load_weights_only(path: Path, *, what: str, safe_globals: list | tuple = ()) -> dict:
    """``torch.load(path, weights_only=True)`` of a dict; every failure is one DetkdError naming the file
    and ``what`` it was read as ("checkpoint", "backbone weights"), never a torch traceback."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise DetkdError(f"{path}: {refusal(str(exc))}") from None
        raise DetkdError(f"{path}: cannot read {what} (UnpicklingError: {exc})") from None
    except Exception as exc:  # torch raises many types for a corrupt file
        raise DetkdError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        kind = "a state dict" if what == "backbone weights" else f"a {what}"
        raise DetkdError(f"{path}: not {kind} (got {type(state).__name__})")
    return state
