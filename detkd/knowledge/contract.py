"""What a teacher hands to distillation methods for one batch, and what a source can offer."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from detkd.data.loader import Batch

# What a method may declare in ``needs`` (checked when it is registered):
#   features: the teacher's dense maps (or sparse cells, for methods with ``sparse_ok``)
#   importance: the teacher's Grad-CAM maps (GKD), spatial [B, 1, H, W] and channel [B, C]
#   boxes: the ground truth (``DistillContext.targets``)
#   student_importance: the student's own Grad-CAM maps (GKD's parity mode)
#   coefficients: not a need but a permission, added by the distillation task when every method has
#   ``coefficient_ok``: a lowrank store may then serve its coefficient maps as they are (no reconstruction)
KNOWLEDGE_KINDS = frozenset({"features", "importance", "boxes", "student_importance", "coefficients"})


@dataclass
class SparseCells:
    """Teacher feature vectors at selected cells of one level, for a whole batch."""

    batch_index: Tensor  # int64 [K]
    yx: Tensor  # int64 [K, 2], cell coordinates on the level's feature map
    values: Tensor  # float32 [K, C'], C' = teacher_channels // channel_group
    score: Tensor | None = None  # float32 [K], optional per-cell weight (e.g. saliency)


@dataclass(frozen=True)
class ChannelBasis:
    """A low-rank basis of one level's teacher features (a store's ``lowrank`` encoding).

    ``mean`` [C] and ``basis`` [C, r] with orthonormal columns: a teacher map is kept as its r
    coefficients ``basis^T (t - mean)`` per cell and served as ``mean + basis @ coefficients``.
    """

    mean: Tensor  # float32 [C]
    basis: Tensor  # float32 [C, r]
    kept: float | None = None  # share of the fit sample's variance the basis keeps (None: not recorded)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def coefficients(self, x: Tensor, dim: int = 1) -> Tensor:
        """[..., C, ...] -> [..., r, ...] along ``dim``."""
        x = x.movedim(dim, -1)
        return ((x - self.mean.to(x)) @ self.basis.to(x)).movedim(-1, dim)

    def reconstruct(self, c: Tensor, dim: int = 1) -> Tensor:
        """[..., r, ...] -> [..., C, ...] along ``dim``: the map the coefficients stand for."""
        c = c.movedim(dim, -1)
        return (c @ self.basis.to(c).T + self.mean.to(c)).movedim(-1, dim)

    def project(self, x: Tensor, dim: int = 1) -> Tensor:
        """Orthogonal projection onto the basis' affine subspace: what the store keeps of ``x``."""
        return self.reconstruct(self.coefficients(x, dim), dim)

    def to(self, device: torch.device | str) -> ChannelBasis:
        return ChannelBasis(mean=self.mean.to(device), basis=self.basis.to(device), kept=self.kept)


@dataclass
class TeacherKnowledge:
    """What a teacher source hands to methods for one batch. Absent parts are None.

    ``channel_group`` > 1 means stored features were compressed by grouped channel max
    pooling (C -> C/r); ``bases`` means dense maps were kept as low-rank coefficients and are
    served reconstructed (full width C), or, with ``coefficients``, as the coefficient maps
    themselves ([B, rank, H, W]; padding holds the coefficients of a zero map, what the
    reconstructed form holds there). Either way methods compare like with like by passing their
    adapted student maps through ``match`` (or ``match_conv``). In coefficient form a squared
    distance over channels equals the reconstructed one plus a constant (the basis is
    orthonormal), so its gradients are the same at rank / C of the cost; ``full_channels`` gives
    the width a per-channel mean divides by.
    """

    features: dict[str, Tensor] | None = None  # dense [B, C', H, W] per level
    cells: dict[str, SparseCells] | None = None
    importance: dict[str, Tensor] | None = None  # GKD spatial importance [B, 1, H, W] in [0, 1]
    channel_importance: dict[str, Tensor] | None = None  # GKD channel weights w_k [B, C]
    channel_group: int = 1
    bases: dict[str, ChannelBasis] | None = None
    coefficients: bool = False  # levels with a basis hold its coefficient maps, not reconstructed maps

    def basis_of(self, level: str) -> ChannelBasis | None:
        """The stored basis of a lowrank level, else None."""
        return (self.bases or {}).get(level)

    def in_coefficients(self, level: str) -> bool:
        return self.coefficients and self.basis_of(level) is not None

    def match(self, level: str, x: Tensor, dim: int = 1) -> Tensor:
        """An adapted student map (teacher width) in the form the teacher knowledge has: grouped
        channel max pooling and/or projection onto the level's stored basis (its coefficients, in
        coefficient form), so that the student is compared with what the store kept of the teacher,
        not penalised for what it dropped."""
        x = channel_group_max(x, self.channel_group, dim)
        basis = self.basis_of(level)
        if basis is not None:
            x = basis.coefficients(x, dim) if self.coefficients else basis.project(x, dim)
        return x

    def match_conv(self, level: str, conv: nn.Module, x: Tensor) -> Tensor:
        """``match(level, conv(x))`` for an NCHW map. On a level with a stored basis a convolution into
        the teacher's width is folded with the basis into one convolution straight to the rank's
        coefficients (same numbers, rank / C of the work), served as they are in coefficient form
        and reconstructed otherwise; without a basis the convolution runs as it is."""
        basis = self.basis_of(level)
        foldable = isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and self.channel_group == 1
        if not (foldable and basis is not None):
            return self.match(level, conv(x))
        b = basis.basis.to(conv.weight)  # [C, r]
        weight = torch.einsum("cr,cikl->rikl", b, conv.weight)
        mean = basis.mean.to(conv.weight)
        bias = (-mean if conv.bias is None else conv.bias - mean) @ b
        c = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return c if self.coefficients else basis.reconstruct(c, dim=1)

    def kept_variance(self) -> dict[str, float | None]:
        """Per lowrank level, the share of the teacher's variance its basis keeps (None: not recorded)."""
        return {lv: b.kept for lv, b in (self.bases or {}).items() if self.features and lv in self.features}

    def variance_restored(self) -> TeacherKnowledge | None:
        """The same knowledge with each lowrank level's deviation from the basis mean scaled by
        1 / sqrt(kept), so that on the fit sample it carries the teacher's whole variance again, not
        the kept share of it. Training never sees it: the ``auto`` weight calibrates on it, so that a
        loss computed from a store is balanced at the size the same loss has on the live teacher.
        None when no level has a recorded share below one."""
        scales = {lv: k**-0.5 for lv, k in self.kept_variance().items() if k is not None and 0.0 < k < 1.0}
        if not scales:
            return None
        features = dict(self.features)
        for lv, s in scales.items():
            t = features[lv]
            if self.in_coefficients(lv):  # coefficients are already deviations from the mean
                features[lv] = t * s
            else:
                mean = self.basis_of(lv).mean.to(t).view(1, -1, *([1] * (t.dim() - 2)))
                features[lv] = mean + (t - mean) * s
        return replace(self, features=features)

    def full_channels(self, level: str, compared: int) -> int:
        """The channel count a per-channel mean over ``compared`` channels divides by: the teacher's
        full width in coefficient form (so the loss keeps its reconstructed scale), else ``compared``."""
        return int(self.basis_of(level).basis.shape[0]) if self.in_coefficients(level) else compared


@dataclass(frozen=True)
class KnowledgeOffer:
    """What a source can serve, for the capability check made before training starts.

    ``sparse_levels``: levels served as SparseCells only (no whole maps); ``importance``:
    Grad-CAM maps available; ``describe``: how an error message names the source.
    """

    levels: tuple[str, ...]
    sparse_levels: tuple[str, ...] = ()
    importance: bool = True
    describe: str = "the teacher"


class TeacherSource(Protocol):
    """A live teacher or a store: ``knowledge(batch, needs)`` for each training batch."""

    levels: list[str]
    strides: dict[str, int]
    channels: dict[str, int]

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge: ...

    def to(self, device: torch.device | str) -> TeacherSource: ...


def level_sizes(canvas, strides: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Feature map size of each level on a canvas: strided convs round up, ceil(canvas / stride)."""
    return {lvl: (-(-canvas[0] // s), -(-canvas[1] // s)) for lvl, s in strides.items()}


def channel_group_max(x: Tensor, group: int, dim: int = 1) -> Tensor:
    """Grouped channel max pooling: C -> C/group by the max of each contiguous group."""
    if group == 1:
        return x
    dim = dim % x.dim()
    c = x.shape[dim]
    if c % group:
        raise ValueError(f"{c} channels cannot be split into groups of {group}")
    shape = list(x.shape)
    shape[dim : dim + 1] = [c // group, group]
    return x.reshape(shape).amax(dim=dim + 1)


def gather_cells(feature: Tensor, cells: SparseCells) -> Tensor:
    """Student (or dense teacher) vectors [K, C] at the cells' positions of an NCHW map."""
    return feature[cells.batch_index, :, cells.yx[:, 0], cells.yx[:, 1]]
