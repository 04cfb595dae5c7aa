"""Structured KD: attention-guided feature imitation plus non-local (relation) distillation.

Reference: Zhang & Ma, "Improve Object Detection with Feature-based Knowledge Distillation",
ICLR 2021; extended as "Structured Knowledge Distillation for Accurate and Efficient Object
Detection", TPAMI 2023. Code: the original two-stage ``forward_train`` (copies only) and
MMRazor's port ``mmrazor/models/losses/fbkd_loss.py`` + ``connectors/fbkd_connector.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.distill.adapters import LevelAdapters, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.distill.masks import channel_attention, spatial_attention
from detkd.knowledge import TeacherKnowledge

MASK_ORDERS = ("code", "paper")
AT_FORMS = ("code", "paper")
NL_LEVEL_KEYS = frozenset({"reduction", "pool"})


class NonLocal2d(nn.Module):
    """Dot-product non-local block ``z = x + BN(W_z(theta(x)^T phi(x) g(x) / M))`` with sub-sampled keys.

    theta, phi, g are 1x1 convs C -> C_i; phi and g are followed by a ``pool x pool`` max
    pool (stride = kernel, floor mode as the reference ``nn.MaxPool2d``); M is the number of
    pooled key positions. BN weight and bias start at 0, so the block starts as the identity.

    The dot-product form has no softmax, so ``(theta^T phi) g^T = theta^T (phi g^T)``: the
    block is evaluated in that order, an [N, C_i, C_i] matrix instead of an [N, HW, M] one
    (same numbers, no quadratic memory on P2).
    """

    def __init__(self, channels: int, *, reduction: int = 2, pool: int = 2) -> None:
        super().__init__()
        if reduction < 1 or pool < 1:
            raise ValueError(f"non-local block: reduction and pool must be >= 1, got {reduction}, {pool}")
        inter = max(1, channels // reduction)
        self.pool = int(pool)
        self.theta = nn.Conv2d(channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter, kernel_size=1)
        self.g = nn.Conv2d(channels, inter, kernel_size=1)
        self.w_z = nn.Conv2d(inter, channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def _subsample(self, x: Tensor) -> Tensor:
        if self.pool == 1:
            return x
        # A map smaller than the pool keeps one key row/column instead of failing.
        kernel = (min(self.pool, x.shape[-2]), min(self.pool, x.shape[-1]))
        return F.max_pool2d(x, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [N, Ci, HW]
        phi = self._subsample(self.phi(x)).flatten(2)  # [N, Ci, M]
        g = self._subsample(self.g(x)).flatten(2)  # [N, Ci, M]
        kv = torch.bmm(phi, g.transpose(1, 2)) / phi.shape[-1]  # [N, Ci, Ci]: sum_m phi_m g_m^T / M
        y = torch.bmm(kv.transpose(1, 2), theta)  # [N, Ci, HW]: y_p = sum_m (theta_p . phi_m) g_m / M
        return x + self.bn(self.w_z(y.reshape(n, -1, h, w)))


def _l2(a: Tensor, b: Tensor) -> Tensor:
    """``torch.dist(a, b)``: L2 norm of the whole difference (not squared, not averaged)."""
    return torch.linalg.vector_norm(a - b)


@register_method("structured")
class StructuredKD(DistillMethod):
    """Structured KD: attention-masked imitation, attention transfer and non-local relation distillation.

    Per level, ``F^T`` teacher, ``F^S`` student, ``g`` a 1x1 adapter, ``T`` the temperature,
    ``a_sp(F) = mean_C |F|`` and ``a_ch(F) = mean_HW |F|``:

    * masks (detached): ``mask_order="code"`` (default, the original code and MMRazor):
      ``M_sp = (HW softmax(a_sp(F^T)/T) + r HW softmax(a_sp(F^S)/T)) / (1 + r)``;
      ``"paper"`` (the paper's wording, add the attention then softmax):
      ``M_sp = HW softmax((a_sp(F^T) + r a_sp(F^S)) / T)``. ``M_ch`` likewise over channels.
    * ``structured.am = w_am * sqrt(sum_{n,k,i,j} (F^T - g(F^S))^2 M_sp[n,i,j] (M_ch[n,k]))``,
      the channel mask only with ``channel_mask=True`` (code default: spatial only).
    * ``at_form="code"`` (default): ``structured.at_ch = w_ch ||mean_HW F^T - Lin(mean_HW F^S)||_2``,
      ``structured.at_sp = w_sp ||mean_C F^T - Conv3x3(mean_C F^S)||_2`` (signed means, learnable
      Linear C_s->C_t and 1->1 3x3 conv). ``"paper"``: ``w_ch ||a_ch(F^T) - a_ch(F^S)||_2`` and
      ``w_sp ||a_sp(F^T) - a_sp(F^S)||_2`` (attention maps, no extra modules).
    * ``structured.nl = w_nl ||W_a(NL_S(F^S)) - NL_T(F^T)||_2`` with trainable dot-product
      non-local blocks for both sides (``NonLocal2d``) and a 1x1 conv W_a; the teacher tensor
      is detached, NL_T's own parameters train through this term only.

    Each term is summed over levels. Native reduction: sqrt of the whole-batch sum / whole-batch
    L2 norm (``torch.dist``), no division by N, as the reference; the weights are tuned for it,
    so the loss grows with batch and image size. Computed in fp32.

    Student attention comes from the raw student map (as the reference); where a channel-indexed
    quantity is needed and the student width differs from the teacher's (channel mask, paper
    L_AT), from the adapted map ``g(F^S)``.

    Args:
        levels: levels to distill (reference: all FPN outputs).
        temperature: T for both masks, 0.5 (reference; some derivatives use 0.1).
        student_ratio: r, the student's share in the masks, 1.0.
        w_am: 7e-5; w_ch, w_sp: 4e-3 each; w_nl: 7e-5 (the reference code's values; a
            multi-teacher derivative multiplies all by 6). A zero weight skips the term and
            builds none of its modules.
        channel_mask: also weight L_AM by M_ch, False (the original two-stage code and MMRazor
            pass no channel mask; a single-stage derivative does).
        mask_order: "code" (default, reproducible) or "paper", see above.
        at_form: "code" (default, reproducible) or "paper", see above.
        nl_reduction: C_i = C // nl_reduction, 2.
        nl_pool: key/value max-pool size, 2.
        nl_levels: per-level overrides ``{level: {"reduction": r, "pool": s}}``; the reference
            Faster R-CNN setup is ``{P2: {reduction: 4, pool: 8}, P3: {reduction: 4, pool: 4}}``.
        adapter: kind of g, "conv1x1" (the reference always adapts, also 256 -> 256).
        adapter_init: initialisation of g (see ``build_adapter``), PyTorch default.
    """

    needs = frozenset({"features"})
    sparse_ok = False

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        temperature: float = 0.5,
        student_ratio: float = 1.0,
        w_am: float = 7e-5,
        w_ch: float = 4e-3,
        w_sp: float = 4e-3,
        w_nl: float = 7e-5,
        channel_mask: bool = False,
        mask_order: str = "code",
        at_form: str = "code",
        nl_reduction: int = 2,
        nl_pool: int = 2,
        nl_levels: dict[str, dict[str, int]] | None = None,
        adapter: str = "conv1x1",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(levels=levels)
        if temperature <= 0:
            raise ValueError(f"structured: temperature must be positive, got {temperature}")
        if student_ratio < 0:
            raise ValueError(f"structured: student_ratio must be >= 0, got {student_ratio}")
        if mask_order not in MASK_ORDERS:
            raise ValueError(f"structured: mask_order {mask_order!r} unknown; choose one of {MASK_ORDERS}")
        if at_form not in AT_FORMS:
            raise ValueError(f"structured: at_form {at_form!r} unknown; choose one of {AT_FORMS}")
        nl_levels = dict(nl_levels or {})
        for lvl, opts in nl_levels.items():
            if lvl not in levels:
                raise ValueError(f"structured: nl_levels names level {lvl!r}, not one of {sorted(levels)}")
            if not set(opts) <= NL_LEVEL_KEYS:
                raise ValueError(f"structured: nl_levels[{lvl!r}] keys {sorted(opts)}; allowed {sorted(NL_LEVEL_KEYS)}")
        self.temperature = float(temperature)
        self.student_ratio = float(student_ratio)
        self.w_am, self.w_ch, self.w_sp, self.w_nl = float(w_am), float(w_ch), float(w_sp), float(w_nl)
        self.channel_mask = bool(channel_mask)
        self.mask_order = mask_order
        self.at_form = at_form

        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)
        if at_form == "code" and self.w_ch:
            self.channel_fc = nn.ModuleDict(
                {lvl: nn.Linear(spec.student_channels, spec.teacher_channels) for lvl, spec in levels.items()}
            )
        if at_form == "code" and self.w_sp:
            self.spatial_conv = nn.ModuleDict({lvl: nn.Conv2d(1, 1, kernel_size=3, padding=1) for lvl in levels})
        if self.w_nl:
            nl_s, nl_t, w_a = {}, {}, {}
            for lvl, spec in levels.items():
                opts = {"reduction": nl_reduction, "pool": nl_pool, **nl_levels.get(lvl, {})}
                nl_s[lvl] = NonLocal2d(spec.student_channels, **opts)
                nl_t[lvl] = NonLocal2d(spec.teacher_channels, **opts)
                w_a[lvl] = nn.Conv2d(spec.student_channels, spec.teacher_channels, kernel_size=1)
            self.nl_student = nn.ModuleDict(nl_s)
            self.nl_teacher = nn.ModuleDict(nl_t)
            self.nl_adapt = nn.ModuleDict(w_a)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        if teacher.channel_group != 1:
            raise ValueError(
                f"structured needs full-width teacher features (channel attention, Linear and non-local blocks "
                f"use every channel), got channel_group={teacher.channel_group}"
            )
        weights = {"am": self.w_am, "at_ch": self.w_ch, "at_sp": self.w_sp, "nl": self.w_nl}
        terms: dict[str, list[Tensor]] = {k: [] for k, w in weights.items() if w}
        for lvl in self.levels:
            t = teacher_feature(teacher, lvl, method=self.name)
            for key, value in self._level_losses(lvl, student[lvl].float(), t, teacher).items():
                terms[key].append(value)
        return {f"structured.{k}": weights[k] * torch.stack(v).sum() for k, v in terms.items()}

    def masks(self, s: Tensor, s_adapted: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Detached combined masks: spatial [N, H, W] and channel [N, C_t]."""
        s_ch = s if s.shape[1] == t.shape[1] else s_adapted
        with torch.no_grad():
            temp, r = self.temperature, self.student_ratio
            if self.mask_order == "code":
                sp = (spatial_attention(t, temp) + r * spatial_attention(s, temp)) / (1 + r)
                ch = (channel_attention(t, temp) + r * channel_attention(s_ch, temp)) / (1 + r)
            else:
                n, c, h, w = t.shape
                a_sp = t.abs().mean(dim=1) + r * s.abs().mean(dim=1)
                a_ch = t.abs().mean(dim=(2, 3)) + r * s_ch.abs().mean(dim=(2, 3))
                sp = h * w * torch.softmax(a_sp.reshape(n, -1) / temp, dim=1).reshape(n, h, w)
                ch = c * torch.softmax(a_ch / temp, dim=1)
        return sp, ch

    def _level_losses(
        self, level: str, s: Tensor, t: Tensor, teacher: TeacherKnowledge | None = None
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        s_adapted = self.adapters.adapt(level, s, teacher)
        if self.w_am:
            sp, ch = self.masks(s, s_adapted, t)
            weight = sp[:, None]
            if self.channel_mask:
                weight = weight * ch[:, :, None, None]
            # sqrt(sum d^2 M) as the norm of d sqrt(M): equal value, and a finite gradient at d = 0.
            out["am"] = torch.linalg.vector_norm((t - s_adapted) * weight.sqrt())
        if self.w_ch:
            if self.at_form == "code":
                out["at_ch"] = _l2(t.mean(dim=(2, 3)), self.channel_fc[level](s.mean(dim=(2, 3))))
            else:
                s_ch = s if s.shape[1] == t.shape[1] else s_adapted
                out["at_ch"] = _l2(t.abs().mean(dim=(2, 3)), s_ch.abs().mean(dim=(2, 3)))
        if self.w_sp:
            if self.at_form == "code":
                out["at_sp"] = _l2(t.mean(dim=1, keepdim=True), self.spatial_conv[level](s.mean(dim=1, keepdim=True)))
            else:
                out["at_sp"] = _l2(t.abs().mean(dim=1), s.abs().mean(dim=1))
        if self.w_nl:
            relation_s = self.nl_adapt[level](self.nl_student[level](s))
            out["nl"] = _l2(relation_s, self.nl_teacher[level](t))
        return out
