"""Grad-CAM importance maps (GKD): where and in which channels a detector's loss is sensitive.

Reference: Lan & Tian, "Gradient-Guided Knowledge Distillation for Object Detectors" (WACV 2024),
code ``lanqz7766/GKD`` (``mmdet/utils/det_cam_visualizer.py``). Computed by a live teacher for
each batch, or once at store build time (``detkd store build --importance``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detkd.models.detector import Detector
from detkd.models.gradcam import feature_gradients

IMPORTANCE_MODES = ("signed", "abs")
CAM_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (x - min) / (max + 1e-7)
CAM_TARGETS = ("gt", "predictions")  # what the teacher's Grad-CAM loss is taken against


@dataclass
class TeacherImportance:
    """The teacher's features and the Grad-CAM maps computed from them, per level."""

    features: dict[str, Tensor]  # [N, C, H, W]
    spatial: dict[str, Tensor]  # [N, 1, H, W] in [0, 1]
    channel: dict[str, Tensor]  # [N, C]


def importance_maps(
    features: dict[str, Tensor],
    grads: dict[str, Tensor],
    *,
    channel_mode: str = "signed",
    activation_mode: str = "signed",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Grad-CAM per level from features ``A`` [N, C, H, W] and ``dL/dA`` of the same shape.

    ``w_k = mean_HW(dL/dA_k)`` (``channel_mode="abs"``: of ``|dL/dA_k|``, the released code);
    ``G = ReLU(sum_k w_k A_k)`` (``activation_mode="abs"``: ``|A_k|``, the released code), then
    min-max normalised per image to [0, 1]. The signed forms are Grad-CAM and the paper's Eq. 1.

    Returns (spatial maps ``{level: [N, 1, H, W]}``, channel weights ``{level: [N, C]}``), fp32,
    detached. A constant map (e.g. a level the loss does not reach) normalises to zeros.
    """
    for mode in (channel_mode, activation_mode):
        if mode not in IMPORTANCE_MODES:
            raise ValueError(f"importance mode {mode!r} unknown; choose one of {IMPORTANCE_MODES}")
    missing = sorted(set(features) - set(grads))
    if missing:
        raise ValueError(f"importance_maps: no gradients for levels {missing}")
    spatial: dict[str, Tensor] = {}
    channel: dict[str, Tensor] = {}
    for lvl, a in features.items():
        a = a.detach().float()
        g = grads[lvl].detach().float()
        if g.shape != a.shape:
            raise ValueError(f"importance_maps: level {lvl!r} gradient {tuple(g.shape)} != features {tuple(a.shape)}")
        w = (g.abs() if channel_mode == "abs" else g).mean(dim=(2, 3))  # [N, C]
        act = a.abs() if activation_mode == "abs" else a
        cam = torch.relu((w[:, :, None, None] * act).sum(dim=1, keepdim=True))  # [N, 1, H, W]
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)
        spatial[lvl] = cam / (cam.amax(dim=(2, 3), keepdim=True) + CAM_EPS)
        channel[lvl] = w
    return spatial, channel


def teacher_importance(
    detector: Detector,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
    *,
    channel_mode: str = "signed",
    activation_mode: str = "signed",
) -> TeacherImportance:
    """The teacher's Grad-CAM maps for its detection loss against ``targets`` (its parameters frozen)."""
    features, grads = feature_gradients(detector, images, image_sizes, targets)
    spatial, channel = importance_maps(features, grads, channel_mode=channel_mode, activation_mode=activation_mode)
    return TeacherImportance(features=features, spatial=spatial, channel=channel)


def pseudo_targets(detections: list[dict[str, Tensor]], *, topk: int, score_thresh: float) -> list[dict]:
    """The ``topk`` highest-scoring detections above ``score_thresh`` per image, as loss targets."""
    out = []
    for det in detections:
        keep = det["scores"] > score_thresh
        order = det["scores"][keep].argsort(descending=True)[:topk]
        out.append({"boxes": det["boxes"][keep][order].detach(), "labels": det["labels"][keep][order].detach()})
    return out
