"""PKD: feature imitation through the Pearson correlation of normalised FPN features.

Reference: MMRazor ``mmrazor/models/losses/pkd_loss.py`` (Cao et al., "PKD: General
Distillation Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detkd.distill.adapters import LevelAdapters, graph_zero, teacher_cells, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.knowledge import TeacherKnowledge


def normalize_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """[M, C] -> zero mean, unit (unbiased) std per channel over the M rows; ``(x - mu) / (std + eps)``."""
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, keepdim=True)
    return (x - mean) / (std + eps)


def pkd_loss(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """PKD on row-major samples [M, C]: ``mean((norm(S) - norm(T))^2) / 2`` (= 1 - Pearson r, averaged over C)."""
    return F.mse_loss(normalize_channels(student, eps), normalize_channels(teacher, eps)) / 2


def _rows(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N*H*W, C]: each channel's statistics are taken over (N, H, W)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@register_method("pkd")
class PKD(DistillMethod):
    """PKD: MSE of per-channel standardised student and teacher features (1 - Pearson r), dense or stored cells.

    Per level (term ``pkd.<l>``): each channel of the adapted student and of the teacher is
    standardised over (N, H, W) - over the K stored cells with a sparse store - with the
    unbiased std and ``eps`` added to it (as MMRazor), then
    ``weight * mean_{n,c,i,j} (S_hat - T_hat)^2 / 2``. Native reduction: mean over elements.
    Up to ``eps``, the loss ignores any positive per-channel affine change of either side. A level with
    fewer than 2 stored cells contributes 0 (no std).

    Args:
        levels: levels to distill.
        weight: loss weight per level. Default 10 = MMRazor's RetinaNet/FCOS->RetinaNet
            configs (``pkd_fpn_retina_x101_retina_r50_2x_coco.py``); its Faster R-CNN config
            uses 6. (MMRazor's ``PKDLoss`` class default is 1.0.)
        adapter: "auto" (reference: no adapter; a 1x1 conv only where channels differ), or
            any ``build_adapter`` kind.
        adapter_init: adapter initialisation, PyTorch default.
        eps: added to the std, 1e-6 as in MMRazor.
    """

    needs = frozenset({"features"})
    sparse_ok = True

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        weight: float = 10.0,
        adapter: str = "auto",
        adapter_init: str = "default",
        eps: float = 1e-6,
    ) -> None:
        super().__init__(levels=levels)
        self.weight = float(weight)
        self.eps = float(eps)
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        r = teacher.channel_group
        out: dict[str, Tensor] = {}
        for lvl in self.levels:
            if teacher.cells is not None:
                cells = teacher_cells(teacher, lvl, method=self.name)
                s = self.adapters.adapt_cells(lvl, student[lvl], cells, channel_group=r).float()
                t = cells.values
            else:
                s = _rows(self.adapters.adapt(lvl, student[lvl], teacher).float())
                t = _rows(teacher_feature(teacher, lvl, method=self.name))
            loss = graph_zero(s) if s.shape[0] < 2 else pkd_loss(s, t, self.eps)
            out[f"pkd.{lvl}"] = self.weight * loss
        return out
