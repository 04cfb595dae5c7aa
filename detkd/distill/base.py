"""The distillation-method protocol, the batch context and the method registry.

A method is a small nn.Module registered by name. It owns its adapters, declares what
teacher knowledge it needs, and returns named loss terms (already weighted). It never
knows whether the knowledge came from a live teacher or from a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from detkd.knowledge import KNOWLEDGE_KINDS, TeacherKnowledge
from detkd.registry import Registry

METHODS: Registry[type[DistillMethod]] = Registry("distillation method")


def register_method(name: str):
    """Class decorator: ``@register_method("fitnet")``; sets ``cls.name``."""

    def decorator(cls):
        unknown = set(cls.needs) - KNOWLEDGE_KINDS
        if unknown:
            kinds = sorted(KNOWLEDGE_KINDS)
            raise ValueError(f"method {name!r} needs {sorted(unknown)}: not kinds of knowledge {kinds}")
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
class DistillContext:
    """Batch facts a method may use: ground truth in canvas pixels and valid image sizes."""

    targets: list[dict[str, Tensor]]
    image_sizes: list[tuple[int, int]]
    step: int = 0
    # The student's own Grad-CAM maps {level: [N, 1, H, W]}, for methods that need "student_importance".
    student_importance: dict[str, Tensor] | None = None


class DistillMethod(nn.Module):
    """Base class. Subclasses set ``needs`` and ``sparse_ok`` and implement ``forward``.

    ``needs``: kinds of knowledge it uses (``detkd.knowledge.KNOWLEDGE_KINDS``). ``sparse_ok``:
    the method can also run from SparseCells (position-wise losses only); such a method gets
    ``teacher.cells`` instead of ``teacher.features`` when the store holds sparse cells.
    ``coefficient_ok``: its loss reads dense teacher maps only through squared distances over
    channels to student maps passed through ``match``/``match_conv`` (per-cell weights allowed,
    per-channel ones not), so a lowrank store may serve its coefficient maps unreconstructed.
    """

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset({"features"})
    sparse_ok: ClassVar[bool] = False
    coefficient_ok: ClassVar[bool] = False

    def __init__(self, *, levels: dict[str, LevelSpec]) -> None:
        super().__init__()
        if not levels:
            raise ValueError(f"{type(self).__name__}: no feature levels to distill")
        self.levels = dict(levels)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        raise NotImplementedError  # abstractmethod: every registered method overrides it
