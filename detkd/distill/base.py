"""The distillation-method protocol, the teacher-knowledge container and the method registry.

A method is a small nn.Module registered by name. It owns its adapters, declares what
teacher knowledge it needs, and returns named loss terms (already weighted). It never
knows whether the knowledge came from a live teacher or from a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from detkd.registry import Registry

METHODS: Registry[type[DistillMethod]] = Registry("distillation method")


def register_method(name: str):
    """Class decorator: ``@register_method("fitnet")``; sets ``cls.name``."""

    def decorator(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def describe_methods() -> list[tuple[str, str]]:
    """(name, first line of the docstring) for every registered method."""
    return [(name, (cls.__doc__ or "").strip().splitlines()[0]) for name, cls in METHODS.items()]


@dataclass(frozen=True)
class LevelSpec:
    """One FPN level shared by teacher and student (same stride, so same spatial size)."""

    student_channels: int
    teacher_channels: int
    stride: int


@dataclass
class SparseCells:
    """Teacher feature vectors at selected cells of one level, for a whole batch."""

    batch_index: Tensor  # int64 [K]
    yx: Tensor  # int64 [K, 2], cell coordinates on the level's feature map
    values: Tensor  # float32 [K, C'], C' = teacher_channels // channel_group
    score: Tensor | None = None  # float32 [K], optional per-cell weight (e.g. saliency)


@dataclass
class TeacherKnowledge:
    """What a teacher source hands to methods for one batch. Absent parts are None.

    ``channel_group`` > 1 means stored features were compressed by grouped channel max
    pooling (C -> C/r); methods apply the same pooling to the adapted student features.
    """

    features: dict[str, Tensor] | None = None  # dense [B, C', H, W] per level
    cells: dict[str, SparseCells] | None = None
    importance: dict[str, Tensor] | None = None  # GKD spatial importance [B, 1, H, W] in [0, 1]
    channel_importance: dict[str, Tensor] | None = None  # GKD channel weights w_k [B, C]
    channel_group: int = 1


@dataclass
class DistillContext:
    """Batch facts a method may use: ground truth in canvas pixels and valid image sizes."""

    targets: list[dict[str, Tensor]]
    image_sizes: list[tuple[int, int]]
    step: int = 0
    extras: dict = field(default_factory=dict)


# What a method can declare in ``needs``.
KNOWLEDGE_KINDS = frozenset({"features", "cells", "importance", "boxes"})


class DistillMethod(nn.Module):
    """Base class. Subclasses set ``needs`` and ``sparse_ok`` and implement ``forward``.

    ``needs``: knowledge kinds the dense path uses ("features", "importance") plus "boxes"
    if it reads ground truth. ``sparse_ok``: the method can also run from SparseCells
    (position-wise losses only); such a method gets ``teacher.cells`` instead of
    ``teacher.features`` when the store holds sparse cells.
    """

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset({"features"})
    sparse_ok: ClassVar[bool] = False

    def __init__(self, *, levels: dict[str, LevelSpec]) -> None:
        super().__init__()
        if not levels:
            raise ValueError(f"{type(self).__name__}: no feature levels to distill")
        self.levels = dict(levels)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        raise NotImplementedError  # abstractmethod: every registered method overrides it


def channel_group_max(x: Tensor, group: int, dim: int = 1) -> Tensor:
    """Grouped channel max pooling: C -> C/group by the max of each contiguous group."""
    if group == 1:
        return x
    c = x.shape[dim]
    if c % group:
        raise ValueError(f"{c} channels cannot be split into groups of {group}")
    shape = list(x.shape)
    shape[dim : dim + 1] = [c // group, group]
    return x.reshape(shape).amax(dim=dim + 1)


def gather_cells(feature: Tensor, cells: SparseCells) -> Tensor:
    """Student (or dense teacher) vectors [K, C] at the cells' positions of an NCHW map."""
    return feature[cells.batch_index, :, cells.yx[:, 0], cells.yx[:, 1]]


def zero_loss(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)
