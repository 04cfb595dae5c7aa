"""Replayable geometric augmentation.

A View is drawn per sample, recorded, and can be applied again later: the same view on the
same image gives a bit-identical tensor and boxes. The knowledge store keys teacher
features by (image id, view) and training replays stored views.

Preprocessing order: resize so the longer side equals ``size`` (aspect kept), then flip.
The result is placed top-left on a fixed square canvas by the collate function, so an
image's features do not depend on which other images share its batch.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.data.defaults import INPUT_SIZE


@dataclass(frozen=True, order=True)
class View:
    size: int  # longer image side after resizing, in pixels
    flip: bool = False

    @property
    def key(self) -> str:
        return f"s{self.size}{'-flip' if self.flip else ''}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> View:
        return cls(size=int(d["size"]), flip=bool(d["flip"]))

    @classmethod
    def from_key(cls, key: str) -> View:
        flip = key.endswith("-flip")
        return cls(size=int(key.removesuffix("-flip").removeprefix("s")), flip=flip)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of the given size after this view."""
        scale = self.size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))


def apply_view(image: Tensor, boxes: Tensor, view: View) -> tuple[Tensor, Tensor]:
    """Apply ``view`` to a uint8 CHW image and its xyxy boxes.

    Returns a float32 image in [0, 1] and the boxes in the view's pixel coordinates.
    """
    _, h, w = image.shape
    out_h, out_w = view.output_size(h, w)
    # out of place: ``.to`` is a no-op on a float32 input, and an in-place divide would change the caller's image
    x = image.to(torch.float32) / 255.0
    if (out_h, out_w) != (h, w):
        x = F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.clamp_(0.0, 1.0)
    b = boxes.to(torch.float32).reshape(-1, 4)  # reshape first: an empty box list may come as shape [0]
    scale = torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h], dtype=torch.float32, device=b.device)
    b = b * scale
    if view.flip:
        x = x.flip(-1)
        b = torch.stack([out_w - b[:, 2], b[:, 1], out_w - b[:, 0], b[:, 3]], dim=1)
    return x.contiguous(), b


def boxes_to_original(boxes: Tensor, view: View, orig_size: tuple[int, int]) -> Tensor:
    """Map xyxy boxes predicted in a view's coordinates back to the original image."""
    h, w = orig_size
    out_h, out_w = view.output_size(h, w)
    b = boxes.to(torch.float32).reshape(-1, 4)
    if view.flip:
        b = torch.stack([out_w - b[:, 2], b[:, 1], out_w - b[:, 0], b[:, 3]], dim=1)
    scale = torch.tensor([w / out_w, h / out_h, w / out_w, h / out_h], dtype=torch.float32, device=b.device)
    return b * scale


@dataclass(frozen=True)
class ViewPolicy:
    """How training views are drawn: a scale among ``sizes`` and a horizontal flip."""

    sizes: tuple[int, ...] = (INPUT_SIZE,)
    flip_prob: float = 0.5

    def sample(self, rng: random.Random) -> View:
        size = self.sizes[0] if len(self.sizes) == 1 else rng.choice(self.sizes)
        return View(size=size, flip=rng.random() < self.flip_prob)

    def eval_view(self) -> View:
        return View(size=max(self.sizes), flip=False)

    def all_views(self) -> list[View]:
        """Every view this policy can draw (what a store holds by default)."""
        flips = [False, True] if self.flip_prob > 0 else [False]
        return [View(size=s, flip=f) for s in self.sizes for f in flips]

    @property
    def canvas(self) -> int:
        """Side of the square canvas every batch is padded to (multiple of 32)."""
        return -(-max(self.sizes) // 32) * 32
