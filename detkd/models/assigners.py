"""ATSS anchor assignment (Zhang et al., CVPR 2020) for torchvision's RetinaNet.

torchvision's RetinaNet labels an anchor positive when its IoU with a box is >= 0.5, so small objects
get few positives. ATSS instead takes, per box and FPN level, the anchors whose centres are nearest
the box centre, and keeps those whose IoU exceeds the mean + standard deviation of the candidates'
IoUs (and whose centre lies inside the box): an adaptive threshold per object.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.ops import box_iou

BACKGROUND = -1  # torchvision's Matcher.BELOW_LOW_THRESHOLD: a negative anchor


def atss_assign(boxes: Tensor, anchors: Tensor, anchors_per_level: list[int], top_k: int = 9) -> Tensor:
    """Index of the box each anchor is assigned to, or -1 (background); [A] int64.

    ``boxes`` [G, 4] and ``anchors`` [A, 4] are xyxy; anchors are ordered level by level with
    ``anchors_per_level`` of them on each level. ``top_k`` candidates are taken per box and level.
    An anchor claimed by several boxes goes to the one it overlaps most.
    """
    num_anchors = anchors.shape[0]
    if boxes.numel() == 0:
        return torch.full((num_anchors,), BACKGROUND, dtype=torch.int64, device=anchors.device)
    if sum(anchors_per_level) != num_anchors:
        raise ValueError(f"anchors_per_level sums to {sum(anchors_per_level)}, but there are {num_anchors} anchors")
    ious = box_iou(boxes, anchors)  # [G, A]
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    distances = torch.cdist(box_centres, anchor_centres)  # [G, A]

    candidates = []
    start = 0
    for count in anchors_per_level:
        k = min(top_k, count)
        nearest = distances[:, start : start + count].topk(k, dim=1, largest=False).indices
        candidates.append(nearest + start)
        start += count
    candidates = torch.cat(candidates, dim=1)  # [G, k x levels]

    candidate_ious = ious.gather(1, candidates)
    threshold = candidate_ious.mean(dim=1, keepdim=True) + candidate_ious.std(dim=1, keepdim=True).nan_to_num(0.0)
    c = anchor_centres[candidates]  # [G, K, 2]
    inside = (
        (c[..., 0] > boxes[:, None, 0])
        & (c[..., 0] < boxes[:, None, 2])
        & (c[..., 1] > boxes[:, None, 1])
        & (c[..., 1] < boxes[:, None, 3])
    )
    positive = (candidate_ious >= threshold) & inside

    claimed = torch.full_like(ious, -1.0)  # IoU where box g claims anchor a, else -1
    claimed.scatter_(1, candidates, torch.where(positive, candidate_ious, torch.full_like(candidate_ious, -1.0)))
    best_iou, best_box = claimed.max(dim=0)
    return torch.where(best_iou >= 0, best_box, torch.full_like(best_box, BACKGROUND))


class ATSSRetinaNet(RetinaNet):
    """torchvision's RetinaNet with ATSS assignment in place of its IoU-threshold matcher.

    Everything else (heads, focal and box losses, inference) is torchvision's. The level sizes ATSS
    needs are recorded when the head runs, so torchvision's own ``forward`` works unchanged.
    """

    def __init__(self, *args, atss_top_k: int = 9, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.atss_top_k = atss_top_k
        self._cells_per_level: list[int] = []
        self._hook = self.head.register_forward_pre_hook(self._record_level_sizes)

    def for_inference(self) -> RetinaNet:
        """This model as a plain torchvision RetinaNet (same modules and outputs; ATSS only changes
        training). TorchScript cannot script the level-size hook, so export goes through this."""
        self._hook.remove()
        self.__class__ = RetinaNet
        return self

    def _record_level_sizes(self, _module, args) -> None:
        self._cells_per_level = [f.shape[-2] * f.shape[-1] for f in args[0]]

    def compute_loss(self, targets, head_outputs, anchors):
        per_cell = anchors[0].shape[0] // sum(self._cells_per_level)
        per_level = [n * per_cell for n in self._cells_per_level]
        # Each anchor position has per_cell anchors at one centre: widen the candidate pool to match.
        top_k = self.atss_top_k * per_cell
        matched = [atss_assign(t["boxes"], a, per_level, top_k=top_k) for t, a in zip(targets, anchors, strict=True)]
        return self.head.compute_loss(targets, head_outputs, anchors, matched)
