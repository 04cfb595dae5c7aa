"""CWD: channel-wise distillation with per-channel spatial distributions.

Reference: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021;
code MMRazor ``mmrazor/models/losses/cwd.py`` and ``configs/distill/mmdet/cwd/``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detkd.distill.adapters import LevelAdapters, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.knowledge import TeacherKnowledge


def cwd_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """``tau^2 / (N*C) * sum_{n,c} KL(softmax_HW(T_nc / tau) || softmax_HW(S_nc / tau))`` in fp32."""
    n, c = student.shape[:2]
    log_s = F.log_softmax(student.float().reshape(n * c, -1) / tau, dim=1)
    log_t = F.log_softmax(teacher.float().reshape(n * c, -1) / tau, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum() * (tau**2) / (n * c)


@register_method("cwd")
class CWD(DistillMethod):
    """Channel-wise distillation: KL(teacher || student) between per-channel spatial softmax maps.

    Per level (term ``cwd.<l>``): every channel's H x W map becomes a distribution
    ``softmax_HW(y_c / tau)``; the loss is
    ``weight * tau^2 / (N*C') * sum_{n,c} KL(phi(T_nc) || phi(S_nc))``, computed in fp32.
    Native reduction: sum over positions, mean over (image, channel). Adding a constant to a
    channel map of either side leaves the loss unchanged.

    Args:
        levels: levels to distill (MMRazor: all neck outputs).
        tau: softmax temperature, 1.0 (MMRazor detection configs).
        weight: loss weight per level, 10 (MMRazor ``cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py``).
        adapter: "auto" (reference: no adapter; 1x1 conv only where channels differ) or any
            ``build_adapter`` kind.
        adapter_init: adapter initialisation, PyTorch default.
    """

    needs = frozenset({"features"})
    sparse_ok = False

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        tau: float = 1.0,
        weight: float = 10.0,
        adapter: str = "auto",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(levels=levels)
        if tau <= 0:
            raise ValueError(f"cwd: tau must be positive, got {tau}")
        self.tau = float(tau)
        self.weight = float(weight)
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for lvl in self.levels:
            t = teacher_feature(teacher, lvl, method=self.name)
            s = self.adapters.adapt(lvl, student[lvl], teacher)
            out[f"cwd.{lvl}"] = self.weight * cwd_loss(s, t, self.tau)
        return out
