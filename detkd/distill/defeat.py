"""DeFeat: decoupled foreground/background feature imitation with ground-truth box masks.

Reference: Guo et al., "Distilling Object Detectors via Decoupled Features", CVPR 2021; code
``ggjy/DeFeat.pytorch`` (``mmdet/apis/train.py`` neck-decouple loss,
``mmdet/models/dense_heads/anchor_head.py:get_gt_mask``, ``two_stage_kd.py`` adapters,
``configs/kd_faster_rcnn/voc_stu_faster_rcnn_r50_decouple_neck.py`` weights). Only the neck
(FPN) part; the optional RoI-logit KL of the paper is not included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from detkd.distill.adapters import LevelAdapters, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.distill.masks import batch_box_masks, flat_boxes, gt_boxes
from detkd.knowledge import TeacherKnowledge

LEVEL_ASSIGNMENTS = ("scale", "all")


def assign_box_levels(boxes: Tensor, num_levels: int, canonical: float = 56.0) -> Tensor:
    """FPN level index per xyxy box: ``clamp(floor(log2(sqrt(w*h) / canonical)), 0, L-1)``.

    Index 0 is the finest distilled level; boxes smaller than 2*canonical pixels go there.
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).to(torch.float32)
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    k = torch.floor(torch.log2(scale / canonical + 1e-6))  # 1e-6 as the reference: no log2(0)
    return k.clamp(0, num_levels - 1).to(torch.int64)


@register_method("defeat")
class DeFeat(DistillMethod):
    """DeFeat: decoupled foreground/background feature MSE with ground-truth box masks (needs boxes).

    Per level, with the binary GT-box mask ``M`` (boxes projected with ``box / stride``), the
    squared error ``D = (g(F^S) - F^T)^2`` and C' compared channels:

    * ``L_fg = sum M D / max(1, 2 * sum(M) * C')``
    * ``L_bg = sum (1 - M) D / max(1, 2 * sum(1 - M) * C')``

    both summed over the whole batch, then averaged over levels. Terms ``defeat.fg`` =
    ``fg_weight * L_fg`` and ``defeat.bg`` = ``bg_weight * L_bg``. Native reduction:
    sum / (2 * masked cells * C), batch included. Padded cells count as background, as in the
    reference.

    Args:
        levels: levels to distill (reference: P2-P6 of Faster R-CNN, all neck outputs).
        fg_weight: 3 (``hint_neck_w``).
        bg_weight: 12 (``hint_neck_back_w``).
        adapter: "conv3x3" per level (reference ``neck_adapt``, no ReLU).
        adapter_init: "small_normal", the reference ``normal_().fmod_(2).mul_(1e-4)``.
        level_assignment: "scale" (reference): each box marks foreground only on the level
            the FPN RoI rule ``k = clamp(floor(log2(sqrt(wh) / canonical_scale)), 0, L-1)``
            assigns it to, counted from the finest distilled level (so the imitation follows
            the level that detects that size; other levels see its cells as background).
            "all": every box marks every level, as FGD and structured KD do.
        canonical_scale: box size (pixels) of the level-0 octave in that rule, 56.
    """

    needs = frozenset({"features", "boxes"})
    sparse_ok = False
    coefficient_ok = True  # squared distances with per-cell masks

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        fg_weight: float = 3.0,
        bg_weight: float = 12.0,
        adapter: str = "conv3x3",
        adapter_init: str = "small_normal",
        level_assignment: str = "scale",
        canonical_scale: float = 56.0,
    ) -> None:
        super().__init__(levels=levels)
        if level_assignment not in LEVEL_ASSIGNMENTS:
            raise ValueError(
                f"defeat: level_assignment {level_assignment!r} unknown; choose one of {LEVEL_ASSIGNMENTS}"
            )
        if not (canonical_scale > 0 and math.isfinite(canonical_scale)):
            raise ValueError(f"defeat: canonical_scale must be positive, got {canonical_scale}")
        self.fg_weight = float(fg_weight)
        self.bg_weight = float(bg_weight)
        self.level_assignment = level_assignment
        self.canonical_scale = float(canonical_scale)
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)
        # level index of the assignment rule: finest stride first, whatever order the caller used
        self.order = sorted(self.levels, key=lambda lvl: self.levels[lvl].stride)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        boxes = gt_boxes(ctx.targets, method=self.name)
        n = len(boxes)
        flat, image = flat_boxes(boxes)
        level_of = None
        if self.level_assignment == "scale":
            level_of = assign_box_levels(flat, len(self.order), self.canonical_scale)
        fg_total, bg_total = [], []
        for index, lvl in enumerate(self.order):
            t = teacher_feature(teacher, lvl, method=self.name)
            s = self.adapters.adapt(lvl, student[lvl], teacher).float()
            _, c, h, w = s.shape
            c = teacher.full_channels(lvl, c)
            keep = slice(None) if level_of is None else level_of == index
            b, i = flat[keep].to(s.device), image[keep].to(s.device)
            mask = batch_box_masks(b, i, n, self.levels[lvl].stride, h, w)[:, None]
            sq = (s - t).pow(2)
            fg_total.append((sq * mask).sum() / (2 * mask.sum() * c).clamp(min=1))
            bg_total.append((sq * (1 - mask)).sum() / (2 * (1 - mask).sum() * c).clamp(min=1))
        return {
            "defeat.fg": self.fg_weight * torch.stack(fg_total).mean(),
            "defeat.bg": self.bg_weight * torch.stack(bg_total).mean(),
        }
