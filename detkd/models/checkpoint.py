"""Detector checkpoints: detkd's own (self-describing) and plain torchvision state dicts.

Loading never executes code: ``torch.load(weights_only=True)`` accepts tensors and plain
containers only (plus detkd's own ``DetectorSpec`` dataclass, which checkpoints before the
spec was stored as a dict carry). Anything else is refused naming the file.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from detkd.errors import DetkdError
from detkd.models.builders import DetectorSpec, build_detector, torchvision_spec
from detkd.models.detector import Detector
from detkd.models.files import file_sha256, load_weights_only  # noqa: F401  (file_sha256 re-exported: runs and the store use it)

FORMAT = "detkd-detector"
VERSION = 1
TMP_SUFFIX = ".tmp"  # ``last.pt`` is written as ``last.pt.tmp`` and renamed into place

# The only non-plain type a detkd checkpoint may hold: old checkpoints pickled the spec dataclass.
SAFE_GLOBALS = [DetectorSpec]


def save_checkpoint(path: str | Path, detector: Detector, *, class_names: list[str], extra: dict | None = None) -> None:
    """Write atomically (temp file + rename): a killed run never leaves a truncated checkpoint.

    Everything saved must load with ``weights_only=True``: the spec is a plain dict. A failed
    write removes its temp file and raises OSError naming ``path`` (the CLI prints e.g.
    "<path>: no space left on device").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = detector.spec.to_dict() if isinstance(detector.spec, DetectorSpec) else dict(detector.spec)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "class_names": list(class_names),
        "model": detector.model.state_dict(),
        **(extra or {}),
    }
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        # Through a Python file object, not a path: a failed write then raises OSError with its
        # errno (ENOSPC, ...) instead of torch's opaque "unexpected pos" RuntimeError.
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except RuntimeError as exc:  # torch's writer can still fail on its own; say what we know
        _remove(tmp)
        if _disk_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise DetkdError(f"{path}: cannot write checkpoint ({exc})") from exc
    except BaseException:  # KeyboardInterrupt included: never leave a partial temp file behind
        _remove(tmp)
        raise
    remove_stale_temps(path.parent)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete ``*.pt.tmp`` left by a save that was killed (a kill -9 skips the cleanup above)."""
    removed = []
    for tmp in Path(directory).glob(f"*.pt{TMP_SUFFIX}"):
        if _remove(tmp):
            removed.append(tmp)
    return removed


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def check_classes(
    payload: dict,
    data_classes: list[str],
    *,
    path: str | Path,
    role: str = "checkpoint",
    error: type[DetkdError] = DetkdError,
) -> None:
    """Refuse a checkpoint whose recorded class names differ from the data's (labels would be mismatched)."""
    names = payload.get("class_names")
    if names and list(names) != list(data_classes):
        raise error(f"{path}: {role} classes {names} differ from the data's {list(data_classes)}")


def training_sizes(payload: dict) -> list[int] | None:
    """The ``data.sizes`` of the recipe a checkpoint was trained with (None if it records none)."""
    recipe = (payload.get("run") or {}).get("recipe") or {}
    sizes = (recipe.get("data") or {}).get("sizes")
    return [int(s) for s in sizes] if sizes else None


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's payload, loaded without executing any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise DetkdError(f"{path}: checkpoint file not found")
    payload = load_weights_only(path, what="checkpoint", safe_globals=SAFE_GLOBALS)
    if isinstance(payload.get("spec"), DetectorSpec):  # an old detkd checkpoint
        payload["spec"] = payload["spec"].to_dict()
    return payload


def load_detector(path: str | Path, *, spec: DetectorSpec | dict | None = None) -> tuple[Detector, dict]:
    """Load a detector and its checkpoint payload.

    detkd checkpoints rebuild themselves from the spec they carry (``spec``, if given, must
    match it). A plain torchvision state dict (or one saved from a DDP-wrapped model) needs
    ``spec`` to say what to build; given as a dict, the sizes it leaves out are torchvision's
    (``detkd.models.defaults.TORCHVISION_SIZES``), not the recipe defaults.
    """
    payload = read_checkpoint(path)
    wanted = None if spec is None else _given_spec(path, spec)
    if payload.get("format") == FORMAT:
        ckpt_spec = checkpoint_spec(path, payload)
        if wanted is not None:
            _check_same_architecture(path, wanted, ckpt_spec)
        detector = _build(path, ckpt_spec)
        load_state_dict(detector.model, checkpoint_weights(path, payload), source=path)
        return detector, payload
    if wanted is None:
        raise DetkdError(
            f"{path}: a plain state dict does not say which detector it is; give the model spec "
            "(model.family, model.backbone, model.num_classes, ...) in the recipe"
        )
    detector = _build(path, wanted)
    state = payload.get("state_dict", payload.get("model", payload))
    load_state_dict(detector.model, state, source=path)
    return detector, {"format": "torchvision", "spec": detector.spec, "class_names": None}


def _given_spec(path: str | Path, spec: DetectorSpec | dict) -> DetectorSpec:
    if isinstance(spec, DetectorSpec):
        return spec
    try:
        # A partial dict describes a plain torchvision file: unnamed sizes are torchvision's.
        return torchvision_spec(spec)
    except (TypeError, ValueError) as exc:
        raise DetkdError(f"{path}: invalid detector spec given for it ({exc})") from None


def _build(path: str | Path, spec: DetectorSpec) -> Detector:
    """build_detector, with an unknown family, backbone or assigner named against the file.

    The trunk's initial weights are not read: the file's weights replace them (and the spec's
    ``backbone_weights`` file may be on another machine).
    """
    try:
        return build_detector(spec, read_backbone_weights=False)
    except (KeyError, ValueError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise DetkdError(f"{path}: cannot build the detector it needs ({reason})") from None


def checkpoint_spec(path: str | Path, payload: dict) -> DetectorSpec:
    """The detector spec a detkd checkpoint carries; DetkdError naming the file when absent or bad."""
    raw = payload.get("spec")
    if raw is None:
        raise DetkdError(f"{path}: detkd checkpoint without 'spec': it does not say which detector to build")
    if not isinstance(raw, dict):
        raise DetkdError(f"{path}: checkpoint 'spec' is a {type(raw).__name__}, expected a mapping")
    try:
        return DetectorSpec.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise DetkdError(f"{path}: invalid detector spec in checkpoint ({exc})") from None


def checkpoint_weights(path: str | Path, payload: dict) -> dict:
    """The model state dict of a detkd checkpoint; DetkdError naming the file when absent."""
    state = payload.get("model")
    if not isinstance(state, dict):
        raise DetkdError(f"{path}: detkd checkpoint without model weights ('model' state dict)")
    return state


def load_state_dict(model: nn.Module, state: dict, *, source: str | Path) -> None:
    """Strict load that tolerates DDP ``module.`` and detkd ``model.`` prefixes and names the problem."""
    cleaned = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise DetkdError(f"{source}: weights do not fit the detector: {k!r} is a {type(v).__name__}, not a tensor")
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
