"""The selection policy of a store: which selector per level (``detkd.store.selectors``), cell
budgets, channel pooling and value dtype; it turns one teacher batch into per-image records.

Conventions shared by every selector:

* Cell (y, x) of a level with stride s covers canvas pixels [s*y, s*(y+1)) x [s*x, s*(x+1)).
  Images sit top-left on the canvas, so the valid (unpadded) cells of an h x w image are the
  first ceil(h/s) rows and ceil(w/s) columns (as ``detkd.distill.masks.valid_cell_mask``).
* Results are ordered by score (descending), ties by row-major index (ascending), so the
  same input always gives the same cells in the same order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from detkd.errors import ConfigError
from detkd.knowledge import ChannelBasis, KnowledgeOffer
from detkd.store.codec import COEFFICIENT_ONLY_DTYPES, VALUE_DTYPES
from detkd.store.detections import detection_cells
from detkd.store.format import LevelRecord, StoreError
from detkd.store.peaks import SALIENCY
from detkd.store.selectors import SELECTORS, LevelBatch, Selector

_FP16_MAX = 65504.0


def default_top_k(stride: int) -> int:
    """Cells kept per level: 48 at stride 8, halving per octave (24, 12, 6, 3 for P4-P7, 96 for P2)."""
    return max(1, 384 // int(stride))


def valid_cells(image_size: tuple[int, int], stride: int, shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a level's map covered by an image of ``image_size`` = (h, w) pixels."""
    h, w = image_size
    return min(shape[0], -(-int(h) // int(stride))), min(shape[1], -(-int(w) // int(stride)))


@dataclass
class SelectionPolicy:
    """How a store selects and compresses teacher features, per level.

    ``name`` is the default selector (registered in ``detkd.store.selectors``: "nms-ksd": feature
    peaks; "detections": cells of the teacher's detections; "dense": the whole valid map);
    ``per_level`` overrides it by level name,
    e.g. ``{"p6": "dense", "p7": "dense"}``. ``top_k`` is one int for all levels, a per-level dict,
    or None for ``default_top_k(stride)``; ``density`` (if set) further caps each level at
    ceil(density x its valid cells), so the stored fraction of a map does not grow as images shrink.
    Values are stored after grouped channel max pooling by ``channel_group``, as ``value_dtype``:
    "float16", or "int8" / "int4" with a float16 scale per cell (``detkd.store.codec``), or (lowrank
    only) "int2", four levels per coefficient with a step per component. None picks
    int4 for cell selectors (a 1 % budget at 128 px; measured to cost no AP beyond seed noise, see
    README) and float16 for the ``dense`` selector, which exists for methods needing exact whole maps.
    ``channel_group`` None picks the selector's default (4; 1 for ``lowrank``, which projects full-width
    maps). ``lowrank``: ``rank`` coefficients per cell on a per-level principal basis fitted on the
    teacher's features of the first ``fit_views`` image views (``detkd.store.bases``); ``pool``
    {level: k} keeps a lowrank level's coefficient maps at 1/k resolution (k x k means; served repeated
    back to full size), which divides its bytes by k^2 (``detkd.store.codec.encode_levels``);
    ``level_rank`` {level: r} overrides ``rank`` by level: at COCO scale p3 holds three quarters of an
    FPN's cells, so a few coefficients fewer there pay for many more on the coarser levels.
    ``budget_kb``: instead of a rank, the most KB (1024 bytes) one image-view's record may take at COCO
    scale; the build fills in ``level_rank`` and the dtype from the fitted spectra (``detkd.store.budget``;
    ``value_dtype`` None or "auto" lets it choose int2 or int4). ``levels``: the teacher levels stored
    (None: all of them); a run from the store distills these by default. A method whose gain comes from
    some levels (DeFeat on small objects: p3) then spends a store's bytes on them alone.
    """

    name: str = "nms-ksd"
    per_level: dict[str, str] = field(default_factory=dict)
    kernel: int = 3
    threshold: float = 0.0
    threshold_mode: str = "relative"
    top_k: int | dict[str, int] | None = None
    density: float | None = None
    channel_group: int | None = None
    value_dtype: str | None = None
    rank: int = 16
    fit_views: int = 256
    pool: dict[str, int] = field(default_factory=dict)
    level_rank: dict[str, int] = field(default_factory=dict)
    budget_kb: float | None = None
    levels: list[str] | None = None
    saliency: str = "max"
    assign: str = "size"
    dilate: int = 0
    box_scale: float = 4.0

    def __post_init__(self) -> None:
        for level, mode in {"name": self.name, **self.per_level}.items():
            if mode not in SELECTORS:
                where = "name" if level == "name" else f"per_level[{level!r}]"
                raise ConfigError(
                    f"selection policy {where}: unknown {mode!r}; choose one of {', '.join(SELECTORS.names())}"
                )
        self._check_levels()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"selection policy kernel: must be an odd positive integer, got {self.kernel}")
        if self.channel_group is None:
            self.channel_group = SELECTORS.get(self.name).default_channel_group
        if self.channel_group < 1:
            raise ConfigError(f"selection policy channel_group: must be >= 1, got {self.channel_group}")
        if self.channel_group != 1 and any(SELECTORS.get(m).needs_basis for m in [self.name, *self.per_level.values()]):
            raise ConfigError(
                f"selection policy: the lowrank selector projects full-width maps; use channel_group 1, "
                f"not {self.channel_group}"
            )
        if self.rank < 1 or self.fit_views < 1:
            raise ConfigError(f"selection policy: rank and fit_views must be >= 1, got {self.rank}, {self.fit_views}")
        for level, r in self.level_rank.items():
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"selection policy level_rank[{level!r}]: must be an integer >= 1, got {r!r}")
            if not self.selector_for(level).needs_basis:
                raise ConfigError(
                    f"selection policy level_rank[{level!r}]: only lowrank levels have a rank, "
                    f"and {level} is {self.mode_for(level)!r}"
                )
        for level, k in self.pool.items():
            if not isinstance(k, int) or k < 1:
                raise ConfigError(f"selection policy pool[{level!r}]: must be an integer >= 1, got {k!r}")
            if k > 1 and not self.selector_for(level).needs_basis:
                raise ConfigError(
                    f"selection policy pool[{level!r}]: only lowrank levels keep pooled coefficient maps, "
                    f"and {level} is {self.mode_for(level)!r}"
                )
        if self.budget_kb is not None:
            self._check_budget()
        elif self.value_dtype == "auto":
            raise ConfigError("selection policy value_dtype 'auto': only a byte budget (budget_kb) chooses the dtype")
        if self.value_dtype is None:
            self.value_dtype = SELECTORS.get(self.name).default_value_dtype
        if self.value_dtype not in VALUE_DTYPES and self.value_dtype != "auto":
            raise ConfigError(f"selection policy value_dtype: unknown {self.value_dtype!r}; choose {VALUE_DTYPES}")
        if self.value_dtype in COEFFICIENT_ONLY_DTYPES and not all(
            SELECTORS.get(m).needs_basis for m in [self.name, *self.per_level.values()]
        ):
            raise ConfigError(
                f"selection policy value_dtype {self.value_dtype}: only lowrank coefficient maps are stored so (no "
                "per-cell scale); cell values and dense maps need int4, int8 or float16"
            )
        if self.saliency not in SALIENCY:
            raise ConfigError(f"selection policy saliency: unknown {self.saliency!r}; choose one of {SALIENCY}")
        if self.threshold_mode not in ("relative", "absolute"):
            raise ConfigError(f"selection policy threshold_mode: unknown {self.threshold_mode!r}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"selection policy density: must be in (0, 1], got {self.density}")
        if self.assign not in ("size", "all") or self.dilate < 0:
            raise ConfigError(
                f"selection policy: assign must be 'size' or 'all' and dilate >= 0, got {self.assign!r}, {self.dilate}"
            )

    def _check_levels(self) -> None:
        if self.levels is None:
            return
        if isinstance(self.levels, str) or not self.levels or not all(isinstance(lv, str) and lv for lv in self.levels):
            raise ConfigError(f"selection policy levels: a non-empty list of level names, got {self.levels!r}")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"selection policy levels: {self.levels} names a level twice")
        self.levels = list(self.levels)
        top_k = self.top_k if isinstance(self.top_k, dict) else {}
        for what, named in (("per_level", self.per_level), ("top_k", top_k), ("level_rank", self.level_rank)):
            unstored = sorted(set(named) - set(self.levels))
            if unstored:
                raise ConfigError(
                    f"selection policy {what}: level(s) {unstored} are not among the stored {self.levels}"
                )
        unstored = sorted(lv for lv, k in self.pool.items() if k > 1 and lv not in self.levels)
        if unstored:
            raise ConfigError(f"selection policy pool: level(s) {unstored} are not among the stored {self.levels}")

    def stored_levels(self, levels) -> list[str]:
        """Those of a teacher's ``levels`` (in its order) this policy stores."""
        return [lv for lv in levels if self.levels is None or lv in self.levels]

    def _check_budget(self) -> None:
        if not (isinstance(self.budget_kb, (int, float)) and 0 < self.budget_kb < math.inf):
            raise ConfigError(f"selection policy budget_kb: must be a positive number, got {self.budget_kb!r}")
        if not all(SELECTORS.get(m).needs_basis for m in [self.name, *self.per_level.values()]):
            raise ConfigError(
                "selection policy budget_kb: a byte budget chooses lowrank ranks; use --policy lowrank at every level"
            )
        if any(k > 1 for k in self.pool.values()):
            raise ConfigError("selection policy budget_kb: choose either a byte budget or pooled levels, not both")
        if self.value_dtype is None:
            self.value_dtype = "auto"
        if self.value_dtype not in ("auto", "int2", "int4"):
            raise ConfigError(
                "selection policy budget_kb: a budget chooses among int2 and int4 coefficients, "
                f"not {self.value_dtype!r}"
            )

    @property
    def unresolved_budget(self) -> bool:
        """A budget whose ranks the build has not filled in yet (from the fitted spectra)."""
        return self.budget_kb is not None and (self.value_dtype == "auto" or not self.level_rank)

    def rank_for(self, level: str) -> int:
        """Coefficients per cell kept at a lowrank ``level``."""
        return int(self.level_rank.get(level, self.rank))

    def mode_for(self, level: str) -> str:
        return self.per_level.get(level, self.name)

    def selector_for(self, level: str) -> Selector:
        return SELECTORS.get(self.mode_for(level))()

    def needs_basis(self, levels) -> bool:
        """Some level is encoded on a fitted basis (``store.bases`` must fit one before the build)."""
        return any(self.selector_for(lv).needs_basis for lv in levels)

    def check_channels(self, channels: dict[str, int]) -> None:
        """Refuse, before a build, what this policy cannot store of a teacher with these channels per level."""

        def width(level: str) -> int:  # numbers kept per cell
            return (
                self.rank_for(level) if self.selector_for(level).needs_basis else channels[level] // self.channel_group
            )

        odd = [lv for lv in channels if width(lv) % 2]
        if self.value_dtype == "int4" and odd:
            raise StoreError(
                f"int4 values pack two numbers per byte, but level(s) {odd} keep an odd number per cell (channel_group "
                f"{self.channel_group}, numbers per cell {[width(lv) for lv in odd]}); choose another channel_group or "
                "rank, or --value-dtype int8 / int2"
            )
        too_wide = [lv for lv in channels if self.selector_for(lv).needs_basis and self.rank_for(lv) > channels[lv]]
        if too_wide:
            raise StoreError(
                f"rank {[self.rank_for(lv) for lv in too_wide]} exceeds the channels of level(s) {too_wide}; "
                "choose a smaller --rank / --level-rank"
            )

    def needs_detections(self, levels) -> bool:
        """The teacher's detections must be computed for a batch (a detection-based selector is used)."""
        return any(self.selector_for(lv).needs_detections for lv in levels)

    def offer(self, levels, *, importance: bool, describe: str) -> KnowledgeOffer:
        """What knowledge selected by this policy can serve (whole maps only where the selector is dense)."""
        sparse = tuple(lv for lv in levels if not self.selector_for(lv).serves_maps)
        per_level = f", per-level {self.per_level}" if self.per_level else ""
        return KnowledgeOffer(
            levels=tuple(levels),
            sparse_levels=sparse,
            importance=importance,
            describe=f"{describe} (policy {self.name!r}{per_level})",
        )

    def top_k_for(self, level: str, stride: int, valid_hw: tuple[int, int] | None = None) -> int:
        k = self.top_k.get(level) if isinstance(self.top_k, dict) else self.top_k
        k = default_top_k(stride) if k is None else int(k)
        if self.density is not None and valid_hw is not None:
            k = min(k, math.ceil(self.density * valid_hw[0] * valid_hw[1]))
        return k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SelectionPolicy:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"selection policy: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def select_image(
        self,
        features: dict[str, Tensor],
        *,
        image_size: tuple[int, int],
        strides: dict[str, int],
        detections: dict[str, Tensor] | None = None,
        bases: dict[str, ChannelBasis] | None = None,
    ) -> dict[str, LevelRecord]:
        """Select one image view's knowledge: features {level: [C, H, W]} of the image placed top-left
        on the canvas, ``image_size`` its valid (h, w) in pixels, ``detections`` {"boxes": xyxy canvas
        pixels [N, 4], "scores": [N]} for the "detections" selector. Returns CPU LevelRecords."""
        for level, f in features.items():
            if f.dim() != 3:
                raise StoreError(f"level {level!r}: expected one image's features [C, H, W], got {tuple(f.shape)}")
        return self.select_batch(
            {lv: f[None] for lv, f in features.items()},
            image_sizes=[image_size],
            strides=strides,
            detections=None if detections is None else [detections],
            bases=bases,
        )[0]

    def select_batch(
        self,
        features: dict[str, Tensor],
        *,
        image_sizes: list[tuple[int, int]],
        strides: dict[str, int],
        detections: list[dict[str, Tensor]] | None = None,
        bases: dict[str, ChannelBasis] | None = None,
    ) -> list[dict[str, LevelRecord]]:
        """``select_image`` for a batch: features {level: [N, C, H, W]}, one size (and detections) per
        image. Saliency, NMS windows, the gather and channel pooling run once per level for the
        whole batch (a store build spends its time in the teacher, not here)."""
        n = len(image_sizes)
        out: list[dict[str, LevelRecord]] = [{} for _ in range(n)]
        features = {lv: features[lv] for lv in self.stored_levels(features)}
        if self.needs_detections(features) and detections is None:
            raise StoreError("selection policy 'detections' needs the teacher's detections (boxes, scores)")
        det_cells: list = []

        def detection_cells() -> list[dict[str, tuple[Tensor, Tensor]]]:
            # Every detection-selected level at once, per image: each box picks its level.
            if not det_cells:
                det_cells.extend(self._detection_cells(features, image_sizes, strides, detections))
            return det_cells

        for level, feature in features.items():
            f = feature.detach()
            if f.dim() != 4 or f.shape[0] != n:
                raise StoreError(f"level {level!r}: expected features [{n}, C, H, W], got {tuple(f.shape)}")
            if f.shape[1] % self.channel_group:
                raise StoreError(
                    f"level {level!r}: {f.shape[1]} channels cannot be pooled in groups of "
                    f"{self.channel_group}; choose a channel_group dividing it"
                )
            _check_fp16(level, f)
            valid = [valid_cells(size, strides[level], tuple(f.shape[-2:])) for size in image_sizes]
            batch = LevelBatch(
                level=level,
                features=f,
                stride=int(strides[level]),
                valid=valid,
                top_k=[self.top_k_for(level, strides[level], v) for v in valid],
                detection_cells=detection_cells,
                basis=(bases or {}).get(level),
            )
            for i, record in enumerate(self.selector_for(level).select(batch, self)):
                out[i][level] = record
        return out

    def _detection_cells(self, features, image_sizes, strides, detections) -> list[dict[str, tuple[Tensor, Tensor]]]:
        det_levels = [lv for lv in features if self.selector_for(lv).needs_detections]
        out = []
        for i, size in enumerate(image_sizes):
            shapes = {lv: valid_cells(size, strides[lv], tuple(features[lv].shape[-2:])) for lv in det_levels}
            out.append(
                detection_cells(
                    detections[i]["boxes"],
                    detections[i]["scores"],
                    strides={lv: strides[lv] for lv in det_levels},
                    level_shapes=shapes,
                    assign=self.assign,
                    top_k={lv: self.top_k_for(lv, strides[lv], shapes[lv]) for lv in det_levels},
                    dilate=self.dilate,
                    box_scale=self.box_scale,
                )
            )
        return out


def _check_fp16(level: str, f: Tensor) -> None:
    peak = f.abs().amax() if f.numel() else f.new_zeros(())
    if not torch.isfinite(peak):
        raise StoreError(f"level {level!r}: teacher features hold NaN or infinite values; check the teacher")
    if peak > _FP16_MAX:
        raise StoreError(
            f"level {level!r}: teacher features reach |x| = {float(peak):.4g}, beyond float16 "
            f"(65504); the store keeps float16, so such a teacher cannot be stored"
        )
