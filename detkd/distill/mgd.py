"""MGD: masked generative distillation.

Reference: Yang et al., "Masked Generative Distillation", ECCV 2022 (arXiv 2205.01529); code
MMRazor ``mmrazor/models/losses/mgd_loss.py`` and ``architectures/connectors/mgd_connector.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detkd.distill.adapters import LevelAdapters, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.knowledge import TeacherKnowledge


def random_cell_mask(n: int, h: int, w: int, ratio: float, *, like: Tensor) -> Tensor:
    """[N, 1, H, W] of 0 (dropped, probability ``ratio``) and 1 (kept), shared by all channels."""
    u = torch.rand((n, 1, h, w), device=like.device)
    return (u <= 1.0 - ratio).to(like.dtype)  # MMRazor: where(u > 1 - ratio, 0, 1)


class Generator(nn.Sequential):
    """conv3x3 -> ReLU -> conv3x3 at the teacher's width: rebuilds the teacher's map from a masked one."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )


@register_method("mgd")
class MGD(DistillMethod):
    """MGD: the student's aligned map, randomly masked, must regenerate the teacher's map.

    Per level ``l`` (term ``mgd.<l>``): ``A = align(F^S)`` (1x1 conv where widths differ),
    ``M`` a random spatial mask dropping each cell with probability ``mask_ratio`` (all channels
    together), ``G`` = conv3x3 -> ReLU -> conv3x3; the loss is
    ``alpha * sum_{n,c,h,w} (G(A * M) - F^T)^2 / N``. Native reduction: sum over C, H, W, mean
    over the batch (MMRazor's sum-MSE / N). The generator trains with the student and is left
    out of the exported detector. With a channel-pooled store (C -> C/r), the generated map is
    pooled the same way before the comparison.

    Args:
        levels: levels to distill (reference: all neck outputs).
        alpha: loss weight, 2e-5 (MMRazor's detection configs).
        mask_ratio: lambda, the probability a cell is masked, 0.65 (the reference's detection value).
        adapter: alignment of the student's map, "auto" (reference: 1x1 conv only where channels
            differ) or any ``build_adapter`` kind.
        adapter_init: alignment initialisation, PyTorch default.
    """

    needs = frozenset({"features"})
    sparse_ok = False  # the generator's 3x3 convolutions need whole maps
    coefficient_ok = True  # a summed squared distance; the generator's last conv folds with the basis

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        alpha: float = 2e-5,
        mask_ratio: float = 0.65,
        adapter: str = "auto",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(levels=levels)
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mgd: mask_ratio must be in [0, 1], got {mask_ratio}")
        self.alpha = float(alpha)
        self.mask_ratio = float(mask_ratio)
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)
        self.generators = nn.ModuleDict({lvl: Generator(spec.teacher_channels) for lvl, spec in levels.items()})

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for lvl in self.levels:
            t = teacher_feature(teacher, lvl, method=self.name)
            aligned = self.adapters[lvl](student[lvl])  # full teacher width: the generator works there
            n, _, h, w = aligned.shape
            masked = aligned * random_cell_mask(n, h, w, self.mask_ratio, like=aligned)
            first, relu, last = self.generators[lvl]
            generated = teacher.match_conv(lvl, last, relu(first(masked))).float()
            out[f"mgd.{lvl}"] = self.alpha * (generated - t).pow(2).sum() / n
        return out
