"""SSIM feature distillation: structural similarity between min-max normalised FPN maps.

Reference: de Rijk et al., "Structural Knowledge Distillation for Object Detection",
NeurIPS 2022 (arXiv 2211.13133). No official code; the notes point to kornia's SSIM loss
(``kornia/losses/ssim.py``, ``kornia/metrics/ssim.py``), whose numbers this module follows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.distill.adapters import LevelAdapters, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.knowledge import TeacherKnowledge

NORMALIZE_MODES = ("image", "channel")
SMALL_MAP_MODES = ("zeros", "shrink")


def gaussian_window(size: int, sigma: float, *, device=None) -> Tensor:
    """Normalised 1-D Gaussian of odd ``size`` (the 2-D window is its outer product)."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def effective_window(window_size: int, height: int, width: int) -> int:
    """``small_maps="shrink"``: the largest odd window <= min(window_size, H, W).

    Reflect padding needs pad < size on each axis; shrinking the window (same sigma, the
    truncated Gaussian renormalised) never crashes and never invents border values, but a 1x1
    or 2xN map gets a 1x1 window, where SSIM degenerates to the pointwise luminance term (no
    contrast, no structure). That is why it is no longer the default.
    """
    k = min(window_size, height, width)
    return k if k % 2 == 1 else k - 1


def minmax_normalize(x: Tensor, *, mode: str = "image", eps: float = 1e-8) -> Tensor:
    """psi: (x - min) / (max - min + eps) per image over (C, H, W), or per channel over (H, W)."""
    dims = (1, 2, 3) if mode == "image" else (2, 3)
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def ssim_map(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
    eps: float = 1e-12,
    small_maps: str = "zeros",
) -> Tensor:
    """Per-channel, per-position SSIM of two [N, C, H, W] maps (kornia's closed form), fp32.

    Local statistics use a Gaussian window applied as two depthwise (grouped) 1-D convolutions
    after reflect padding ("same" output size, as kornia's ``filter2d``). Reflect padding needs
    the map to be larger than half the window; on smaller maps (P6/P7 of a small image)
    ``small_maps`` decides: "zeros" keeps the full window and pads with zeros, so every level
    keeps its contrast and structure terms (default); "shrink" uses ``effective_window``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two NCHW maps of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):  # variances of small numbers: fp32 only
        x, y = x.float(), y.float()
        n, c, h, w = x.shape
        k, mode = window_size, "reflect"
        if window_size // 2 >= min(h, w):  # reflect padding impossible: the map is smaller than the window
            if small_maps == "shrink":
                k = effective_window(window_size, h, w)
            elif small_maps == "zeros":
                mode = "constant"
            else:
                raise ValueError(f"ssim: small_maps {small_maps!r} unknown; choose one of {SMALL_MAP_MODES}")
        pad = k // 2
        g = gaussian_window(k, sigma, device=x.device)
        stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # one filtering pass for all 5 moments
        if pad:
            stacked = F.pad(stacked, (pad, pad, pad, pad), mode=mode)
        groups = stacked.shape[1]
        stacked = F.conv2d(stacked, g.reshape(1, 1, 1, k).expand(groups, 1, 1, k), groups=groups)
        stacked = F.conv2d(stacked, g.reshape(1, 1, k, 1).expand(groups, 1, k, 1), groups=groups)
        mu_x, mu_y, xx, yy, xy = stacked.split(c, dim=1)
        var_x = xx - mu_x**2
        var_y = yy - mu_y**2
        cov = xy - mu_x * mu_y
        c1 = (k1 * data_range) ** 2
        c2 = (k2 * data_range) ** 2
        num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        return num / (den + eps)


def ssim_loss(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """mean of clamp((1 - SSIM) / 2, 0, 1) over N, C, H, W (kornia ``ssim_loss``, reduction "mean")."""
    return torch.clamp((1.0 - ssim_map(x, y, **kwargs)) / 2.0, min=0.0, max=1.0).mean()


@register_method("ssim")
class SSIMKD(DistillMethod):
    """SSIM KD: (1 - SSIM) / 2 between min-max normalised student and teacher maps per level.

    Per level ``l`` (term ``ssim.<l>``), with ``g`` the optional adapter (1x1 conv by default)
    and ``psi`` the min-max normalisation to [0, 1]:
    ``weight * mean_{n,c,h,w} clamp((1 - SSIM(psi(g(F^S)), psi(F^T))) / 2, 0, 1)``, SSIM per
    channel in an 11x11 Gaussian window (sigma 1.5), C1 = (K1 L)^2, C2 = (K2 L)^2, L = 1 (the
    range after psi). Native reduction: mean over all elements (kornia), summed over levels.
    Computed in fp32 (adapter included) even under autocast.

    Args:
        levels: levels to distill (reference: all neck outputs).
        weight: lambda, 2.0. The paper's ablation finds 2 and 4 best, within ~0.5 AP of each
            other; 2 is the smaller of the two (the safer start next to the detection loss).
        window_size: Gaussian window, 11.
        sigma: window sigma, 1.5 (kornia fixes it).
        k1, k2: SSIM constants, 0.01 and 0.03.
        normalize: psi's axes, "image" (default [I]: per image over C, H, W) or "channel"
            (per image and channel over H, W; less sensitive to outlier activations).
        adapter: student adapter kind, "conv1x1" (paper: a 1x1 conv on the student; it matters
            for cross-architecture pairs), "identity" to switch it off (widths must match),
            or "auto" (identity where widths match).
        adapter_init: adapter initialisation (see ``build_adapter``), PyTorch default.
        small_maps: maps too small for reflect padding (half the window >= H or W; at 128 px
            P6 is 2x2 and P7 1x1): "zeros" (default) keeps the full window with zero padding,
            so contrast and structure still count there; "shrink" (detkd <= 0.1) shrinks the
            window to fit, which leaves a 1x1 window, i.e. a pointwise luminance comparison.
    """

    needs = frozenset({"features"})
    sparse_ok = False  # windows need the dense neighbourhood

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        weight: float = 2.0,
        window_size: int = 11,
        sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        normalize: str = "image",
        adapter: str = "conv1x1",
        adapter_init: str = "default",
        small_maps: str = "zeros",
    ) -> None:
        super().__init__(levels=levels)
        if small_maps not in SMALL_MAP_MODES:
            raise ValueError(f"ssim: small_maps {small_maps!r} unknown; choose one of {SMALL_MAP_MODES}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"ssim: normalize {normalize!r} unknown; choose one of {NORMALIZE_MODES}")
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"ssim: window_size must be a positive odd number, got {window_size}")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"ssim: sigma must be positive, got {sigma}")
        self.weight = float(weight)
        self.window_size = int(window_size)
        self.sigma = float(sigma)
        self.k1 = float(k1)
        self.k2 = float(k2)
        self.normalize = normalize
        self.small_maps = small_maps
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for lvl in self.levels:
            t = teacher_feature(teacher, lvl, method=self.name)
            x = student[lvl]
            # The whole level in fp32, adapter included, so AMP does not change the loss.
            with torch.autocast(device_type=x.device.type, enabled=False):
                s = self.adapters.adapt(lvl, x.float(), teacher)
                s = minmax_normalize(s, mode=self.normalize)
                t = minmax_normalize(t, mode=self.normalize)
                loss = ssim_loss(
                    s,
                    t,
                    window_size=self.window_size,
                    sigma=self.sigma,
                    k1=self.k1,
                    k2=self.k2,
                    small_maps=self.small_maps,
                )
            out[f"ssim.{lvl}"] = self.weight * loss
        return out
