"""Store selectors: how one level's teacher maps become stored records. A registry, so a new
selector (or encoding of whole maps) is one class and its ``@register_selector`` line.

A selector sees one level of one teacher batch (``LevelBatch``) and returns one ``LevelRecord`` per
image: sparse cells (``yx``, ``values``, ``score``), a whole map (``dense``) or a whole map as
low-rank coefficients (``coefficients``). ``serves_maps`` says which, so methods that need whole maps
are refused up front on the others (``KnowledgeOffer``). ``needs_basis``: the selector encodes on a
per-level basis fitted once on the teacher's features before the build (``detkd.store.bases``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from detkd.knowledge import ChannelBasis, channel_group_max
from detkd.registry import Registry
from detkd.store.format import LevelRecord
from detkd.store.peaks import peaks_from_saliency_batch, saliency_map


class PolicySettings(Protocol):
    """What a selector reads of its ``SelectionPolicy`` (typed here: select.py imports this module)."""

    channel_group: int
    kernel: int
    saliency: str
    threshold: float
    threshold_mode: str


@dataclass
class LevelBatch:
    """One level of one teacher batch, as a selector sees it."""

    level: str
    features: Tensor  # [N, C, H, W], detached
    stride: int
    valid: list[tuple[int, int]]  # per image: (rows, cols) of the map its pixels cover (top-left)
    top_k: list[int]  # per image: the policy's cell budget on this level
    # Per image {level: (yx, score)} from the teacher's detections, computed once per batch on demand.
    detection_cells: Callable[[], list[dict[str, tuple[Tensor, Tensor]]]] = field(repr=False, default=list)
    basis: ChannelBasis | None = None  # the level's fitted basis, for selectors with ``needs_basis``


class Selector(ABC):
    """Base class: subclasses set the class attributes and implement ``select``."""

    name: ClassVar[str] = "base"
    serves_maps: ClassVar[bool] = False  # True: whole (valid) maps; False: selected cells only
    needs_detections: ClassVar[bool] = False  # the teacher's post-NMS detections must be computed
    needs_basis: ClassVar[bool] = False  # encodes on a per-level basis fitted before the build
    default_value_dtype: ClassVar[str] = "int4"  # when the policy leaves value_dtype unset
    default_channel_group: ClassVar[int] = 4  # when the policy leaves channel_group unset

    @abstractmethod
    def select(self, batch: LevelBatch, policy: PolicySettings) -> list[LevelRecord]:
        """One record per image of ``batch``: its cells or its whole (valid) map on ``batch.level``."""


SELECTORS: Registry[type[Selector]] = Registry("store selection policy")


def register_selector(name: str):
    """Class decorator: ``@register_selector("nms-ksd")``; sets ``cls.name``."""

    def decorator(cls: type[Selector]) -> type[Selector]:
        cls.name = name
        return SELECTORS.register(name)(cls)

    return decorator


def cell_records(batch: LevelBatch, picks: list[tuple[Tensor, Tensor]], channel_group: int) -> list[LevelRecord]:
    """Records of the picked cells ``[(yx [K, 2], score [K]) per image]``: channel-pooled values."""
    f = batch.features
    counts = [len(cells) for cells, _ in picks]
    owner = torch.repeat_interleave(torch.arange(len(picks), device=f.device), torch.tensor(counts, device=f.device))
    yx = torch.cat([yx for yx, _ in picks])
    values = channel_group_max(f[owner, :, yx[:, 0], yx[:, 1]], channel_group, dim=1)
    # Cast and copy to the CPU once per level; records get contiguous splits of one batch tensor.
    values = values.half().cpu().split(counts)
    cells = yx.to(torch.int16).cpu().split(counts)
    scores = torch.cat([score for _, score in picks]).half().cpu().split(counts)
    return [LevelRecord(yx=cells[i], values=values[i], score=scores[i]) for i in range(len(picks))]


@register_selector("dense")
class DenseSelector(Selector):
    """The whole valid map, channel-pooled, float16: for methods that need exact whole maps."""

    serves_maps = True
    default_value_dtype = "float16"

    def select(self, batch: LevelBatch, policy: PolicySettings) -> list[LevelRecord]:
        out = []
        for i, (vh, vw) in enumerate(batch.valid):
            dense = channel_group_max(batch.features[i, :, :vh, :vw], policy.channel_group, dim=0)
            out.append(LevelRecord(dense=dense.half().cpu().contiguous()))
        return out


@register_selector("nms-ksd")
class PeakSelector(Selector):
    """NMS-KSD: the peaks of a channel-max saliency map, kept by NMS over ``kernel`` x ``kernel`` windows."""

    def select(self, batch: LevelBatch, policy: PolicySettings) -> list[LevelRecord]:
        picks = peaks_from_saliency_batch(
            saliency_map(batch.features, policy.saliency),
            kernel=policy.kernel,
            threshold=policy.threshold,
            threshold_mode=policy.threshold_mode,
            top_k=batch.top_k,
            valid_hw=batch.valid,
        )
        return cell_records(batch, picks, policy.channel_group)


@register_selector("detections")
class DetectionSelector(Selector):
    """The cells under the centres of the teacher's own detections (``detkd.store.detections``)."""

    needs_detections = True

    def select(self, batch: LevelBatch, policy: PolicySettings) -> list[LevelRecord]:
        picks = [cells[batch.level] for cells in batch.detection_cells()]
        return cell_records(batch, picks, policy.channel_group)


@register_selector("lowrank")
class LowRankSelector(Selector):
    """The whole valid map as ``rank`` coefficients per cell on the level's principal basis (fitted once
    on a sample of the teacher's features): methods get every map back, reconstructed, for r / C of the
    width, and compare the student projected on the same basis (``TeacherKnowledge.match``)."""

    serves_maps = True
    needs_basis = True
    default_value_dtype = "int4"
    default_channel_group = 1

    def select(self, batch: LevelBatch, policy: PolicySettings) -> list[LevelRecord]:
        if batch.basis is None:
            raise ValueError(f"level {batch.level!r}: the lowrank selector needs the level's fitted basis")
        coefficients = batch.basis.coefficients(batch.features.float()).half().cpu()
        return [
            LevelRecord(coefficients=coefficients[i, :, :vh, :vw].contiguous())
            for i, (vh, vw) in enumerate(batch.valid)
        ]
