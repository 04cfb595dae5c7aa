"""Adapters: small trainable maps from student channels to teacher channels, one per level.

Adapters belong to the distillation method (they train with the student and are left out of
the exported detector). ``LevelAdapters`` also applies the teacher's grouped channel max
pooling so that methods compare like with like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.distill.base import LevelSpec
from detkd.knowledge import SparseCells, TeacherKnowledge, channel_group_max, gather_cells

ADAPTER_KINDS = ("conv1x1", "conv3x3", "identity")
ADAPTER_INITS = ("default", "identity", "small_normal")


def build_adapter(in_channels: int, out_channels: int, *, kind: str = "conv1x1", init: str = "default") -> nn.Module:
    """One adapter module mapping ``in_channels`` -> ``out_channels`` at the same resolution.

    Args:
        kind: "conv1x1" (FitNet, FGD/CWD alignment), "conv3x3" (FitNets/FGFI/DeFeat, padding 1
            keeps the size) or "identity" (channels must match).
        init: "default" keeps PyTorch's conv init (what mmcv/mmdet reference code gets for a
            plain ``nn.Conv2d``); "identity" sets a Dirac kernel on the first min(in, out)
            channels and zero bias (adapter starts as a pass-through, useful for tests and for
            same-width pairs); "small_normal" is DeFeat's ``normal_().fmod_(2).mul_(1e-4)``
            (a truncated N(0, 1e-4^2)) on the weight, bias left at PyTorch's default.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {kind!r} unknown; choose one of {ADAPTER_KINDS}")
    if init not in ADAPTER_INITS:
        raise ValueError(f"adapter init {init!r} unknown; choose one of {ADAPTER_INITS}")
    if kind == "identity":
        if in_channels != out_channels:
            raise ValueError(
                f"identity adapter needs equal channels, got student {in_channels} -> teacher {out_channels}"
            )
        return nn.Identity()
    k = 1 if kind == "conv1x1" else 3
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=k, padding=k // 2)
    with torch.no_grad():
        if init == "identity":
            nn.init.dirac_(conv.weight)
            nn.init.zeros_(conv.bias)
        elif init == "small_normal":
            conv.weight.normal_().fmod_(2).mul_(1e-4)
    return conv


class LevelAdapters(nn.ModuleDict):
    """level -> adapter for every level of a method.

    Args:
        levels: the method's levels (student and teacher channels per level).
        kind: an adapter kind of ``build_adapter`` or "auto": identity where the channels match
            and a 1x1 conv where they differ (FGD/CWD/PKD reference code adds no adapter for
            equal widths).
        init: adapter initialisation, see ``build_adapter``.
    """

    def __init__(self, levels: dict[str, LevelSpec], *, kind: str = "conv1x1", init: str = "default") -> None:
        super().__init__()
        for name, spec in levels.items():
            if "." in name or not name:
                raise ValueError(f"level name {name!r} cannot name a module (no dots, not empty)")
            k = kind
            if kind == "auto":
                k = "identity" if spec.student_channels == spec.teacher_channels else "conv1x1"
            self[name] = build_adapter(spec.student_channels, spec.teacher_channels, kind=k, init=init)

    def adapt(self, level: str, x: Tensor, teacher: TeacherKnowledge | None = None) -> Tensor:
        """Dense student map [N, Cs, H, W] -> teacher space [N, Ct, H, W], in the form ``teacher``'s
        knowledge has (``TeacherKnowledge.match``: channel-pooled to Ct / channel_group, or projected
        onto a stored low-rank basis, or its coefficients: the adapter conv is then folded with the basis)."""
        if teacher is None:
            return self[level](x)
        return teacher.match_conv(level, self[level], x)

    def adapt_cells(self, level: str, x: Tensor, cells: SparseCells, *, channel_group: int = 1) -> Tensor:
        """Student vectors in teacher space at the cells' positions, [K, Ct / channel_group].

        A 1x1 conv (or identity) is position-wise, so the K vectors are gathered first and
        mapped as a linear layer: the same numbers as adapting the whole map, far less work.
        """
        adapter = self[level]
        if isinstance(adapter, nn.Identity):
            out = gather_cells(x, cells)
        elif isinstance(adapter, nn.Conv2d) and adapter.kernel_size == (1, 1):
            out = F.linear(gather_cells(x, cells), adapter.weight.flatten(1), adapter.bias)
        else:  # spatial kernels need the neighbourhood: adapt densely, then gather
            out = gather_cells(self[level](x), cells)
        return channel_group_max(out, channel_group, dim=1)


def teacher_feature(teacher: TeacherKnowledge, level: str, *, method: str) -> Tensor:
    """The dense teacher map of a level, detached and in fp32 (losses are computed in fp32)."""
    if teacher.features is None:
        raise ValueError(
            f"{method} needs dense teacher features, but the teacher gave "
            + ("only sparse cells (use a dense store or a live teacher)" if teacher.cells is not None else "none")
        )
    if level not in teacher.features:
        raise ValueError(f"{method}: teacher has no features for level {level!r} (has {sorted(teacher.features)})")
    return teacher.features[level].detach().float()


def teacher_cells(teacher: TeacherKnowledge, level: str, *, method: str) -> SparseCells:
    """The stored cells of a level, values detached and in fp32."""
    if teacher.cells is None or level not in teacher.cells:
        have = sorted(teacher.cells) if teacher.cells is not None else []
        raise ValueError(f"{method}: teacher has no sparse cells for level {level!r} (has {have})")
    c = teacher.cells[level]
    score = None if c.score is None else c.score.detach().float()
    return SparseCells(batch_index=c.batch_index, yx=c.yx, values=c.values.detach().float(), score=score)


def graph_zero(x: Tensor) -> Tensor:
    """A 0 loss still attached to ``x``'s graph, so every trainable module gets a (zero) grad (DDP)."""
    return x.sum() * 0.0
