"""Benchmark results as small strict-JSON files: what was run, where, when, and every per-seed number.

README tables are rendered from these files (``detkd bench table``), never typed by hand.
Strict JSON: a missing number is ``null``, never ``NaN``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from detkd.jsonio import dumps


def provenance(command: list[str] | str | None = None) -> dict[str, Any]:
    """command, commit, date (UTC) and machine of a benchmark run."""
    if command is None:
        command = ["detkd", *sys.argv[1:]]
    return {
        "command": command if isinstance(command, str) else " ".join(command),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
    }


def git_commit() -> str | None:
    """The checkout's HEAD (with ``-dirty`` when the tree has changes); outside git (the GPU
    machine gets a copy of the tree without .git) ``$DETKD_COMMIT``, else None."""
    here = Path(__file__).resolve().parent
    run = dict(cwd=here, capture_output=True, text=True, timeout=10)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DETKD_COMMIT") or None
    return sha + ("-dirty" if dirty else "")


def machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def ap_summary(aps: list[float | None]) -> dict[str, Any]:
    """``{"ap": [AP x100 per seed], "mean", "spread" (max - min), "n"}``; failed seeds are null in ``ap``."""
    pts = [None if a is None or not math.isfinite(a) else round(100.0 * a, 2) for a in aps]
    ok = [p for p in pts if p is not None]
    return {
        "ap": pts,
        "mean": round(statistics.mean(ok), 2) if ok else None,
        "spread": round(max(ok) - min(ok), 2) if len(ok) > 1 else None,
        "n": len(ok),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(payload, indent=2) + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: not strict JSON ({constant})")

    return json.loads(Path(path).read_text(), parse_constant=refuse)
