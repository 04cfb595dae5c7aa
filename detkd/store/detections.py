"""The ``detections`` selector: the feature cells under the centres of the teacher's own post-NMS
detections, each box on the level its size belongs to (or on every level)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from detkd.errors import ConfigError


def detection_cells(
    boxes: Tensor,
    scores: Tensor,
    *,
    strides: dict[str, int],
    level_shapes: dict[str, tuple[int, int]],
    assign: str = "size",
    top_k: int | dict[str, int] | None = None,
    dilate: int = 0,
    box_scale: float = 4.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Cells under the centres of detections (xyxy canvas pixels) -> {level: (yx int64 [K, 2], score [K])}.

    ``assign="size"``: each box goes to the one level whose stride s makes ``box_scale * s`` closest
    to the box size sqrt(w*h) in log scale (torchvision RetinaNet/FCOS anchors are 4 x stride: 32 px
    at stride 8 ... 512 px at stride 128); exact ties go to the finer level. ``assign="all"``: every
    level. The centre cell is (floor(cy / s), floor(cx / s)); ``dilate`` d adds its
    (2d+1) x (2d+1) neighbourhood. Cells are clipped to ``level_shapes`` (pass the valid region to
    stay off the padding). A cell hit by several detections takes the best score; then top-K.
    """
    if assign not in ("size", "all"):
        raise ConfigError(f"assign: unknown {assign!r}; choose 'size' or 'all'")
    levels = sorted(strides, key=lambda lv: strides[lv])
    boxes = boxes.reshape(-1, 4).float()
    scores = scores.reshape(-1).float()
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (cx, cy)
    owner = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    if assign == "size" and len(boxes):
        size = (wh[:, 0] * wh[:, 1]).sqrt().clamp(min=1.0)
        level_log = torch.tensor([math.log2(box_scale * strides[lv]) for lv in levels], device=boxes.device)
        owner = (size.log2()[:, None] - level_log[None]).abs().argmin(dim=1)  # first minimum: the finer level
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for i, level in enumerate(levels):
        h, w = (int(v) for v in level_shapes[level])
        k = top_k.get(level) if isinstance(top_k, dict) else top_k
        mine = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device) if assign == "all" else owner == i
        if h <= 0 or w <= 0 or not mine.any() or k == 0:
            out[level] = (boxes.new_zeros((0, 2), dtype=torch.int64), boxes.new_zeros((0,)))
            continue
        # A centre on the far border (or a box beyond the valid region) names its nearest cell.
        cx = torch.floor(centre[mine, 0] / strides[level]).long().clamp(0, w - 1)
        cy = torch.floor(centre[mine, 1] / strides[level]).long().clamp(0, h - 1)
        best = torch.full((h * w,), -math.inf, device=boxes.device)
        for dy in range(-dilate, dilate + 1):
            for dx in range(-dilate, dilate + 1):
                y, x = cy + dy, cx + dx
                inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
                best.scatter_reduce_(0, (y * w + x)[inside], scores[mine][inside], reduce="amax")
        index = torch.isfinite(best).nonzero().squeeze(1)
        score = best[index]
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        index, score = index[order], score[order]
        out[level] = (torch.stack([index // w, index % w], dim=1), score)
    return out


def select_from_detections(
    boxes: Tensor,
    scores: Tensor,
    *,
    strides: dict[str, int],
    level_shapes: dict[str, tuple[int, int]],
    assign: str = "size",
    top_k: int | dict[str, int] | None = None,
    dilate: int = 0,
    box_scale: float = 4.0,
) -> dict[str, Tensor]:
    """Cells of the teacher's own (post-NMS) detections -> {level: yx int64 [K, 2]}; see ``detection_cells``."""
    cells = detection_cells(
        boxes,
        scores,
        strides=strides,
        level_shapes=level_shapes,
        assign=assign,
        top_k=top_k,
        dilate=dilate,
        box_scale=box_scale,
    )
    return {level: yx for level, (yx, _) in cells.items()}
