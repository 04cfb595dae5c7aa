"""FGD: focal (foreground/background, attention-weighted) and global (GcBlock) distillation.

Reference: Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022;
code ``yzd-v/FGD: mmdet/distillation/losses/fgd.py`` and ``configs/distillers/fgd/*.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detkd.distill.adapters import LevelAdapters, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.distill.masks import box_masks, channel_attention, gt_boxes, spatial_attention
from detkd.knowledge import TeacherKnowledge


class GcBlock(nn.Module):
    """Global context block ``R(F) = F + W2 ReLU(LN(W1 sum_j softmax_j(W_k F)_j F_j))`` (FGD's relation module).

    Init as the reference: the context mask conv is Kaiming-normal (fan_in) with zero bias and
    the last transform conv is zero, so ``R`` starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = torch.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)  # [N, 1, HW]
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.channel_add(context)


@register_method("fgd")
class FGD(DistillMethod):
    """FGD: focal (box fg/bg, teacher attention) + attention + global (GcBlock) feature distillation; needs boxes.

    Per level, with the aligned student ``S`` (1x1 conv if widths differ), teacher ``T``,
    batch size N, attentions ``A_s = HW softmax_HW(mean_C|F| / T)`` and
    ``A_c = C softmax_C(mean_HW|F| / T)`` (see ``masks.spatial_attention``/``channel_attention``):

    * ``M_fg = 1 / (cells of the box)`` inside GT boxes (max where they overlap), boxes
      projected with ``box / stride``; ``M_bg = [M_fg == 0] / #bg cells`` per image;
    * ``fgd.fg = alpha_fg * sum M_fg A_s^t A_c^t (S - T)^2 / N`` (and ``fgd.bg`` with M_bg, beta_bg);
    * ``fgd.att = gamma_att * (sum |A_c^s - A_c^t| + sum |A_s^s - A_s^t|) / N``
      (gradient flows through the student's attention);
    * ``fgd.glob = lambda_glob * sum (R_s(S) - R_t(T))^2 / N`` with trainable GcBlocks ``R_s``,
      ``R_t`` per level (the teacher tensor itself gets no gradient).

    Terms are summed over levels. Native reduction: sum / batch size (the weights are tuned
    for it, so they scale with resolution). Computed in fp32.

    Args:
        levels: levels to distill (reference: P3-P7 one-stage, P2-P5 two-stage).
        temperature: attention temperature T, 0.5 (one-stage and two-stage configs; FCOS 0.8).
        alpha_fg: 1e-3; beta_bg: 5e-4; gamma_att: 5e-4; lambda_glob: 5e-6 - the released
            RetinaNet/GFL (one-stage) configs. Two-stage configs: 5e-5, 2.5e-5, 5e-5, 5e-7;
            RepPoints/FCOS: 1.6e-3, 8e-4, 8e-4, 8e-6. (The reference class docstring says
            gamma 1e-3; every one-stage config uses 5e-4.)
        adapter: "auto" (reference: 1x1 conv only where widths differ) or a ``build_adapter`` kind.
        adapter_init: adapter initialisation, PyTorch default (as the reference's plain Conv2d).

    Deviations from the reference code: the fg box covers exactly the cells it touches
    (``[floor(x0/s), ceil(x1/s))``), a documented choice: the reference's mask (rows from y,
    columns from x, as fixed upstream after its first commit) takes one more row and column
    outside each box. Boxes are projected with the stride, not the padded width (FGD pitfall).
    Teacher features compressed by channel grouping are not supported.
    """

    needs = frozenset({"features", "boxes"})
    sparse_ok = False

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        temperature: float = 0.5,
        alpha_fg: float = 1e-3,
        beta_bg: float = 5e-4,
        gamma_att: float = 5e-4,
        lambda_glob: float = 5e-6,
        adapter: str = "auto",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(levels=levels)
        if temperature <= 0:
            raise ValueError(f"fgd: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.alpha_fg = float(alpha_fg)
        self.beta_bg = float(beta_bg)
        self.gamma_att = float(gamma_att)
        self.lambda_glob = float(lambda_glob)
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)
        self.gc_student = nn.ModuleDict({lvl: GcBlock(spec.teacher_channels) for lvl, spec in levels.items()})
        self.gc_teacher = nn.ModuleDict({lvl: GcBlock(spec.teacher_channels) for lvl, spec in levels.items()})

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        if teacher.channel_group != 1:
            raise ValueError(
                f"fgd needs full-width teacher features (its GcBlocks and channel attention use every "
                f"channel), got channel_group={teacher.channel_group}; store the teacher without channel grouping"
            )
        boxes = gt_boxes(ctx.targets, method=self.name)
        terms = {"fg": [], "bg": [], "att": [], "glob": []}
        for lvl in self.levels:
            t = teacher_feature(teacher, lvl, method=self.name)
            s = self.adapters.adapt(lvl, student[lvl], teacher).float()
            for key, value in self._level_losses(lvl, s, t, boxes).items():
                terms[key].append(value)
        weights = {"fg": self.alpha_fg, "bg": self.beta_bg, "att": self.gamma_att, "glob": self.lambda_glob}
        return {f"fgd.{k}": weights[k] * torch.stack(v).sum() for k, v in terms.items()}

    def _level_losses(self, level: str, s: Tensor, t: Tensor, boxes: list[Tensor]) -> dict[str, Tensor]:
        n, _, h, w = s.shape
        spatial_t = spatial_attention(t, self.temperature)  # [N, H, W]
        channel_t = channel_attention(t, self.temperature)  # [N, C]
        spatial_s = spatial_attention(s, self.temperature)
        channel_s = channel_attention(s, self.temperature)

        fg = box_masks([b.to(s.device) for b in boxes], self.levels[level].stride, h, w, mode="inverse_area")
        bg = (fg == 0).to(fg.dtype)
        bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)  # an image fully covered by boxes keeps bg = 0

        weighted = (s - t).pow(2) * spatial_t[:, None] * channel_t[:, :, None, None]
        fg_loss = (weighted * fg[:, None]).sum() / n
        bg_loss = (weighted * bg[:, None]).sum() / n
        att_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
        # The teacher tensor is detached; R_t's own parameters still train, as in the reference.
        glob_loss = (self.gc_student[level](s) - self.gc_teacher[level](t)).pow(2).sum() / n
        return {"fg": fg_loss, "bg": bg_loss, "att": att_loss, "glob": glob_loss}
