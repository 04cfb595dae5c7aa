"""NMS-KSD's peak finding: a channel-max saliency map, then NMS over ``kernel`` x ``kernel`` windows.

Conventions shared by every selector:

* Cell (y, x) of a level with stride s covers canvas pixels [s*y, s*(y+1)) x [s*x, s*(x+1)).
  Images sit top-left on the canvas, so the valid (unpadded) cells of an h x w image are the
  first ceil(h/s) rows and ceil(w/s) columns (as ``detkd.distill.masks.valid_cell_mask``).
* Results are ordered by score (descending), ties by row-major index (ascending), so the
  same input always gives the same cells in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.errors import ConfigError
from detkd.store.format import StoreError

SALIENCY = ("max", "mean_abs")


def saliency_map(feature: Tensor, kind: str = "max") -> Tensor:
    """[..., C, H, W] -> [..., H, W] float32: channel max pooling ("max") or mean absolute activation."""
    if kind == "max":
        return feature.float().amax(dim=-3)
    if kind == "mean_abs":
        return feature.float().abs().mean(dim=-3)
    raise ConfigError(f"saliency: unknown kind {kind!r}; choose one of {SALIENCY}")


def peaks_from_saliency(
    saliency: Tensor,
    *,
    kernel: int = 3,
    threshold: float = 0.0,
    threshold_mode: str = "relative",
    top_k: int | None = None,
    valid_hw: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """NMS on a saliency map [H, W] -> (yx int64 [K, 2], score float32 [K]).

    A cell is kept iff it beats every other cell of its ``kernel`` x ``kernel`` window in the order
    (saliency descending, row-major index ascending): it is a window maximum, and on a tie the
    earlier cell wins. So no two kept cells are within ``kernel // 2`` of each other, and a
    rectangular plateau (e.g. a constant map) keeps exactly one cell, its top-left one.
    Cells outside ``valid_hw`` (rows, cols from the top-left) are padding: never kept and never
    suppress a valid neighbour. Kept cells must also have saliency >= the threshold:
    ``threshold_mode="absolute"`` compares raw saliency; ``"relative"`` (default) compares
    (s - min) / (max - min) over the valid region, so 0.0 disables it and 0.5 keeps the upper
    half of the range. Finally the ``top_k`` best are returned (all if None).
    """
    h, w = saliency.shape
    return peaks_from_saliency_batch(
        saliency[None],
        kernel=kernel,
        threshold=threshold,
        threshold_mode=threshold_mode,
        top_k=[top_k],
        valid_hw=[(h, w) if valid_hw is None else valid_hw],
    )[0]


def peaks_from_saliency_batch(
    saliency: Tensor,
    *,
    kernel: int = 3,
    threshold: float = 0.0,
    threshold_mode: str = "relative",
    top_k: list[int | None],
    valid_hw: list[tuple[int, int]],
) -> list[tuple[Tensor, Tensor]]:
    """``peaks_from_saliency`` for a batch of maps [N, H, W] with one ``top_k`` and ``valid_hw`` per
    map: the window comparison runs once for the whole batch, only the final sort is per map."""
    if kernel < 1 or kernel % 2 == 0:
        raise ConfigError(f"kernel: must be an odd positive integer, got {kernel}")
    if threshold_mode not in ("relative", "absolute"):
        raise ConfigError(f"threshold_mode: unknown {threshold_mode!r}; choose 'relative' or 'absolute'")
    n, h, w = saliency.shape
    rows = torch.arange(h, device=saliency.device)[None, :, None]
    cols = torch.arange(w, device=saliency.device)[None, None, :]
    vh = torch.tensor([min(h, int(v[0])) for v in valid_hw], device=saliency.device)[:, None, None]
    vw = torch.tensor([min(w, int(v[1])) for v in valid_hw], device=saliency.device)[:, None, None]
    valid = (rows < vh) & (cols < vw)  # [N, H, W]
    s = saliency.float().masked_fill(~valid, -math.inf)
    if not torch.isfinite(s[valid]).all():
        raise StoreError("saliency map holds NaN or infinite values: the teacher's features are not finite")
    pad = kernel // 2
    windows = F.unfold(F.pad(s[:, None], (pad, pad, pad, pad), value=-math.inf), kernel)  # [N, k*k, H*W]
    centre = s.reshape(n, -1)
    # Window offsets before the centre in row-major order are exactly the cells with a smaller index.
    earlier = windows[:, : pad * kernel + pad]
    keep = (centre >= windows.amax(dim=1)) & ~(earlier == centre[:, None]).any(dim=1) & valid.reshape(n, -1)
    if threshold_mode == "relative":
        lo = s.masked_fill(~valid, math.inf).amin(dim=(1, 2))[:, None]
        hi = s.amax(dim=(1, 2))[:, None]
        keep &= (centre - lo) >= threshold * (hi - lo)
    else:
        keep &= centre >= threshold
    # One stable sort for the whole batch: kept cells first by score, ties by row-major index (the
    # sort is stable over the index order); each map then takes its first min(kept, top_k) cells.
    score, index = torch.sort(centre.masked_fill(~keep, -math.inf), dim=1, descending=True, stable=True)
    kept = keep.sum(dim=1)
    limit = torch.tensor([h * w if k is None else int(k) for k in top_k], device=saliency.device)
    counts = torch.minimum(kept, limit).tolist()
    yx = torch.stack([index // w, index % w], dim=2)
    return [(yx[i, :c], score[i, :c]) for i, c in enumerate(counts)]


def select_peaks(
    feature: Tensor,
    *,
    kernel: int = 3,
    threshold: float = 0.0,
    threshold_mode: str = "relative",
    top_k: int | None,
    valid_hw: tuple[int, int] | None = None,
    saliency: str = "max",
) -> Tensor:
    """NMS-KSD cell selection on one level [C, H, W] -> yx int64 [K, 2]; see ``peaks_from_saliency``."""
    return peaks_from_saliency(
        saliency_map(feature, saliency),
        kernel=kernel,
        threshold=threshold,
        threshold_mode=threshold_mode,
        top_k=top_k,
        valid_hw=valid_hw,
    )[0]
