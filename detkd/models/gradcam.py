"""Gradients of a detector's own detection loss with respect to its FPN features (for Grad-CAM).

The detector's parameters stay frozen: the loss is backpropagated to the features only. How to
make a detector compute its losses while staying in inference behaviour is model knowledge and
lives here, not with the methods that use the result.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from detkd.models.detector import Detector


@contextmanager
def loss_mode(detector: Detector):
    """Some families compute losses only in training mode (Faster R-CNN's RPN and RoI heads, which hold
    no BatchNorm or dropout, so their outputs do not change): switch those heads, named by the family,
    for the duration; the backbone stays in eval."""
    heads: list[nn.Module] = detector.train_mode_heads()
    for m in heads:
        m.train()
    try:
        yield
    finally:
        for m in heads:
            m.eval()


def feature_gradients(
    detector: Detector, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(features, d loss / d features), both ``{level: [N, C, H, W]}`` and detached, where loss is
    the detector's total detection loss against ``targets``. Levels the loss does not reach get zeros."""
    with torch.no_grad():
        raw = detector.backbone_features(images, image_sizes)
    leaves = OrderedDict((k, v.detach().requires_grad_(True)) for k, v in raw.items())
    with loss_mode(detector), torch.enable_grad():
        losses = detector.losses_from_features(leaves, images, image_sizes, targets)
        grads = torch.autograd.grad(sum(losses.values()), list(leaves.values()), allow_unused=True)
    features = detector.name_features(OrderedDict((k, v.detach()) for k, v in leaves.items()))
    named_grads = detector.name_features(
        OrderedDict(
            (k, torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), grads, strict=True)
        )
    )
    return dict(features), dict(named_grads)
