"""Detector: a torchvision detection model behind one interface, with the feature tap.

detkd does its own resizing (replayable views) and pads every batch onto a fixed canvas, so
torchvision's GeneralizedRCNNTransform is bypassed: the Detector normalises the canvas,
zeroes the padding (as torchvision's batching does) and calls backbone, heads and losses
itself. ``forward_tap`` returns the detection losses *and* the named FPN features from one
forward pass: distillation needs both.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detkd.models.families import DETECTORS
from detkd.models.families.base import Targets


class Detector(nn.Module):
    """Wraps the torchvision model of a registered detector family (``spec["family"]``).

    Images are float [B, 3, H, W] in [0, 1], zero-padded bottom/right; ``image_sizes`` are
    the valid (h, w) of each. Features are named ``p{log2(stride)}`` (p3..p7 for dense
    detectors, p2..p6 for Faster R-CNN). Family-specific work (running the heads, export)
    goes through the family's registration.
    """

    def __init__(self, model: nn.Module, *, spec: dict, image_mean: list[float], image_std: list[float]) -> None:
        super().__init__()
        self._family = DETECTORS.get(spec["family"])
        if not isinstance(model, self._family.model_types):
            raise TypeError(f"unsupported detector {type(model).__name__} for family {spec['family']!r}")
        self.model = model
        self.spec = dict(spec)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.strides, self.channels = self._probe_levels()
        # torchvision FPN key -> detkd level name, in forward order.
        self._names = {raw: f"p{int(math.log2(s))}" for raw, s in self._raw_strides.items()}

    @property
    def family(self) -> str:
        return self.spec["family"]

    @property
    def levels(self) -> list[str]:
        return list(self.strides)

    def train_mode_heads(self) -> list[nn.Module]:
        """Submodules that compute losses only in train mode (see ``DetectorFamily.train_mode_heads``)."""
        return self._family.train_mode_heads(self.model)

    def deployable_model(self) -> nn.Module:
        """A copy of the torchvision model as torchvision's own class, in eval mode (for export)."""
        return self._family.deployable(copy.deepcopy(self.model).eval())

    def _probe_levels(self) -> tuple[dict[str, int], dict[str, int]]:
        size = 256
        with torch.no_grad():
            was_training = self.training
            self.eval()
            feats = self.model.backbone(torch.zeros(1, 3, size, size))
            self.train(was_training)
        self._raw_strides = {k: size // v.shape[-1] for k, v in feats.items()}
        strides = {f"p{int(math.log2(s))}": s for s in self._raw_strides.values()}
        channels = {f"p{int(math.log2(self._raw_strides[k]))}": v.shape[1] for k, v in feats.items()}
        return strides, channels

    # -- preprocessing -----------------------------------------------------------------------------
    def normalize(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
        x = (images - self.image_mean) / self.image_std
        mask = torch.zeros_like(images[:, :1])
        for i, (h, w) in enumerate(image_sizes):
            mask[i, :, :h, :w] = 1
        return x * mask

    def backbone_features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> OrderedDict[str, Tensor]:
        """torchvision-keyed FPN features of a padded [0,1] batch."""
        return self.model.backbone(self.normalize(images, image_sizes))

    def name_features(self, raw: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        return OrderedDict((self._names[k], v) for k, v in raw.items())

    def features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> OrderedDict[str, Tensor]:
        """Named FPN features only (what a feature-only teacher needs)."""
        return self.name_features(self.backbone_features(images, image_sizes))

    # -- losses and predictions ------------------------------------------------------------------
    def forward_tap(
        self, images: Tensor, image_sizes: list[tuple[int, int]], targets: Targets
    ) -> tuple[dict[str, Tensor], OrderedDict[str, Tensor]]:
        """Detection losses (as torchvision computes them in train mode) and named features."""
        raw = self.backbone_features(images, image_sizes)
        losses = self.losses_from_features(raw, images, image_sizes, targets)
        return losses, self.name_features(raw)

    def losses_from_features(
        self, raw: OrderedDict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]], targets: Targets
    ) -> dict[str, Tensor]:
        """Detection losses from torchvision-keyed features (also used to backpropagate a
        teacher's loss to its own features, for gradient-guided KD)."""
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        return self._family.losses(self.model, raw, image_list, targets)

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], targets: Targets) -> dict[str, Tensor]:
        return self.forward_tap(images, image_sizes, targets)[0]

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Post-NMS detections (boxes xyxy in canvas pixels, scores, labels). Call in eval mode."""
        raw = self.backbone_features(images, image_sizes)
        return self.predict_from_features(raw, images, image_sizes)

    def predict_from_features(
        self, raw: OrderedDict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        return self._family.predict(self.model, raw, image_list)
