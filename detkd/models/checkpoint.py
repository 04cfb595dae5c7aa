"""Detector checkpoints: detkd's own (self-describing) and plain torchvision state dicts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from detkd.errors import DetkdError
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.detector import Detector

FORMAT = "detkd-detector"
VERSION = 1


def save_checkpoint(path: str | Path, detector: Detector, *, class_names: list[str], extra: dict | None = None) -> None:
    """Write atomically (temp file + rename): a killed run never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": detector.spec,
        "class_names": list(class_names),
        "model": detector.model.state_dict(),
        **(extra or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DetkdError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise DetkdError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise DetkdError(f"{path}: not a checkpoint (got {type(payload).__name__})")
    return payload


def load_detector(path: str | Path, *, spec: DetectorSpec | dict | None = None) -> tuple[Detector, dict]:
    """Load a detector and its checkpoint payload.

    detkd checkpoints rebuild themselves from the spec they carry. A plain torchvision state
    dict (or one saved from a DDP-wrapped model) needs ``spec`` to say what to build.
    """
    payload = read_checkpoint(path)
    if payload.get("format") == FORMAT:
        ckpt_spec = DetectorSpec.from_dict(payload["spec"])
        if spec is not None:
            wanted = spec if isinstance(spec, DetectorSpec) else DetectorSpec.from_dict(spec)
            _check_same_architecture(path, wanted, ckpt_spec)
        detector = build_detector(ckpt_spec)
        load_state_dict(detector.model, payload["model"], source=path)
        return detector, payload
    if spec is None:
        raise DetkdError(
            f"{path}: a plain state dict does not say which detector it is; give the model spec "
            "(model.family, model.backbone, model.num_classes, ...) in the recipe"
        )
    detector = build_detector(spec)
    state = payload.get("state_dict", payload.get("model", payload))
    load_state_dict(detector.model, state, source=path)
    return detector, {"format": "torchvision", "spec": detector.spec, "class_names": None}


def load_state_dict(model: nn.Module, state: dict, *, source: str | Path) -> None:
    """Strict load that tolerates DDP ``module.`` and detkd ``model.`` prefixes and names the problem."""
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        cleaned[k] = v
    own = model.state_dict()
    missing = sorted(set(own) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(own))
    wrong = sorted(k for k in set(own) & set(cleaned) if own[k].shape != cleaned[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(cleaned[k].shape)} vs model "
                f"{tuple(own[k].shape)})"
            )
        raise DetkdError(f"{source}: weights do not fit the detector: " + "; ".join(parts))
    model.load_state_dict(cleaned, strict=True)


def _check_same_architecture(path: str | Path, wanted: DetectorSpec, found: DetectorSpec) -> None:
    keys = ("family", "backbone", "num_classes", "fpn_channels", "head_convs")
    diff = [f"{k}: checkpoint {getattr(found, k)!r}, expected {getattr(wanted, k)!r}" for k in keys]
    diff = [d for d, k in zip(diff, keys, strict=True) if getattr(found, k) != getattr(wanted, k)]
    if diff:
        raise DetkdError(f"{path}: checkpoint is another architecture ({'; '.join(diff)})")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
