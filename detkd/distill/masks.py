"""Attention maps and box masks shared by several methods (FGD, structured KD, GKD-BMFI)."""

from __future__ import annotations

import torch
from torch import Tensor


def spatial_attention(feature: Tensor, temperature: float) -> Tensor:
    """H*W * softmax over positions of mean_C |F| / T  ->  [N, H, W], mean weight 1."""
    n, _, h, w = feature.shape
    a = feature.abs().mean(dim=1).reshape(n, -1)
    return (h * w * torch.softmax(a / temperature, dim=1)).reshape(n, h, w)


def channel_attention(feature: Tensor, temperature: float) -> Tensor:
    """C * softmax over channels of mean_HW |F| / T  ->  [N, C], mean weight 1."""
    c = feature.shape[1]
    a = feature.abs().mean(dim=(2, 3))
    return c * torch.softmax(a / temperature, dim=1)


def boxes_on_level(boxes: Tensor, stride: int) -> Tensor:
    """Project xyxy canvas-pixel boxes onto a level of the given stride (float cells).

    Padding is bottom/right, so cell (y, x) covers pixels [stride*y, stride*(y+1)): divide
    by the stride, never by the image size (the FGD/GKD padded-width pitfall).
    """
    return boxes.to(torch.float32) / float(stride)


def box_cell_ranges(boxes: Tensor, stride: int, height: int, width: int) -> Tensor:
    """Integer cell ranges [x0, y0, x1, y1) each box covers on a level (at least one cell)."""
    b = boxes_on_level(boxes, stride)
    x0 = b[:, 0].floor().clamp(0, width - 1)
    y0 = b[:, 1].floor().clamp(0, height - 1)
    x1 = torch.maximum(b[:, 2].ceil().clamp(max=width), x0 + 1)
    y1 = torch.maximum(b[:, 3].ceil().clamp(max=height), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)


def valid_cell_mask(image_sizes: list[tuple[int, int]], stride: int, height: int, width: int, device=None) -> Tensor:
    """[N, H, W] bool: cells whose top-left pixel lies inside the unpadded image."""
    ys = torch.arange(height, device=device)[:, None] * stride
    xs = torch.arange(width, device=device)[None, :] * stride
    return torch.stack([(ys < h) & (xs < w) for h, w in image_sizes])


def box_cells(boxes: Tensor, stride: int, height: int, width: int) -> Tensor:
    """[M, H, W] bool: the cells each box covers on a level (``box_cell_ranges``, box / stride)."""
    r = box_cell_ranges(boxes, stride, height, width)
    ys = torch.arange(height, device=boxes.device)[None, :, None]
    xs = torch.arange(width, device=boxes.device)[None, None, :]
    x0, y0, x1, y1 = (r[:, i, None, None] for i in range(4))
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def box_masks(boxes: list[Tensor], stride: int, height: int, width: int, *, mode: str = "binary") -> Tensor:
    """[N, H, W] float32 box mask per image of a batch (xyxy canvas-pixel boxes per image).

    mode "binary": 1 on cells covered by any box. mode "inverse_area": 1 / (cells of the box)
    inside each box, the max where boxes overlap, so the smallest box wins (FGD's fg mask).
    """
    all_boxes, index = flat_boxes(boxes)
    return batch_box_masks(all_boxes, index, len(boxes), stride, height, width, mode=mode)


def flat_boxes(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image box lists -> (all boxes [M, 4], the image index of each [M]), on the boxes' device."""
    flat = [b.reshape(-1, 4) for b in boxes]
    all_boxes = torch.cat(flat) if flat else torch.zeros(0, 4)
    counts = torch.tensor([len(b) for b in flat], dtype=torch.int64)
    return all_boxes, torch.repeat_interleave(torch.arange(len(flat)), counts).to(all_boxes.device)


def batch_box_masks(
    boxes: Tensor, batch_index: Tensor, n: int, stride: int, height: int, width: int, *, mode: str = "binary"
) -> Tensor:
    """``box_masks`` of a whole batch's boxes at once: ``boxes`` [M, 4] with the image of each in
    ``batch_index`` [M], for ``n`` images. One pass per level, not one per image: per-image calls were
    most of a distillation step's overhead on small maps."""
    if mode not in ("binary", "inverse_area"):
        raise ValueError(f"box mask mode {mode!r} unknown; choose 'binary' or 'inverse_area'")
    cells = box_cells(boxes, stride, height, width).flatten(1).to(torch.float32)  # [M, H*W]
    out = torch.zeros(n, height * width, device=boxes.device)
    if mode == "binary":
        out.index_add_(0, batch_index, cells).clamp_(max=1.0)  # covered by any box
    else:  # 1 / box cells, the max where boxes overlap; zeros where no box
        weighted = cells / cells.sum(dim=1, keepdim=True).clamp(min=1)
        out.scatter_reduce_(0, batch_index[:, None].expand_as(weighted), weighted, reduce="amax")
    return out.reshape(n, height, width)


def gt_boxes(targets: list[dict[str, Tensor]], *, method: str) -> list[Tensor]:
    """Ground-truth xyxy canvas-pixel boxes [M_i, 4] per image of a batch, detached."""
    try:
        return [t["boxes"].detach().reshape(-1, 4) for t in targets]
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{method} needs ground-truth boxes: every target must have 'boxes'") from None
