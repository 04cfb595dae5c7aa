"""A lowrank store's layout chosen for a byte budget per image-view instead of a rank.

A user plans disk in bytes, not in ranks: ``SelectionPolicy.budget_kb`` asks for records of at most that
many KB (1024 bytes) per image-view at COCO scale (``detkd.store.projection``, the size ``detkd store
info`` projects), and the build picks the coefficient dtype and each lowrank level's rank once the bases'
fit has measured the teacher's spectra. Per dtype the ranks maximise the share of the teacher's variance
the basis keeps per cell, averaged over every cell of the FPN (so p3, three quarters of the cells, weighs
three quarters; on the shapes benchmark AP followed what p3 kept, and rank on p4-p7 bought nothing):

    share(ranks) = sum_l cells_l * top_share_l(rank_l) / sum_l cells_l

exactly (for budgets up to 64 KiB over the smallest layout; beyond, to 1/65536 of the budget): each step
of a level's rank adds a fixed number of bytes, so the ranks are a knapsack over the bytes the smallest
layout leaves, solved by dynamic programming. Between the dtypes, rounding error counts
``ROUNDING_PENALTY`` times what it removes of the kept variance:

    score(ranks, dtype) = share(ranks) * (1 - ROUNDING_PENALTY * (1 - QUANTISED_SHARE[dtype]))

because a stored loss compares the student with the rounded coefficients, so the student imitates the
rounding error as if it were the teacher, while a dropped component is simply not compared. Measured on
shapes (DeFeat, 3 seeds each, README "Stores fitted to a byte budget"): at 32 KB int2 beat int4 (9.9 vs
8.8), at 128 KB int4 beat int2 (11.5 vs 11.0) though int2 kept more variance after rounding (46 % vs
37 %); penalties from 2.75 to 4 order both pairs right, 1 (plain variance) does not. The spectra are saved
in ``bases.pt``, so a resumed or sharded build makes the same choice without refitting.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
from torch import Tensor

from detkd.store.format import StoreError
from detkd.store.projection import COCO_HW, projected_bytes
from detkd.store.select import SelectionPolicy, valid_cells

log = logging.getLogger(__name__)

# Share of a Gaussian coefficient map's variance each lowrank dtype keeps through the codec
# (tests/store/test_budget.py measures it): int4 at one absmax scale per coefficient map; int2 is
# Max's 4-level quantiser (0.1188 of the variance lost).
QUANTISED_SHARE = {"int4": 0.972, "int2": 1.0 - 0.1188}
BUDGET_DTYPES = tuple(QUANTISED_SHARE)
ROUNDING_PENALTY = 3.0  # fitted on shapes (see the module doc): 2.75-4 order the measured pairs right


@dataclass(frozen=True)
class BudgetChoice:
    """The layout a budget picked: ranks per lowrank level, the dtype, the record's bytes at the budget's
    scale, the cell-weighted share of variance it keeps after rounding (on the fit sample) and the score
    the dtypes were compared by."""

    level_rank: dict[str, int]
    value_dtype: str
    bytes_per_view: int
    kept: float
    score: float


def choose_layout(
    policy: SelectionPolicy,
    spectra: dict[str, Tensor],
    *,
    strides: dict[str, int],
    channels: dict[str, int],
    importance: bool = False,
    image_hw: tuple[int, int] = COCO_HW,
) -> BudgetChoice:
    """The best layout within ``policy.budget_kb`` for the lowrank levels' eigenvalue ``spectra``
    (largest first); other levels keep what their selector stores. Raises StoreError if not even
    rank 1 (2 for int4) fits."""
    if policy.budget_kb is None:
        raise ValueError("choose_layout needs a policy with budget_kb")
    budget = int(policy.budget_kb * 1024)
    lowrank = [lv for lv in strides if policy.selector_for(lv).needs_basis]
    missing = sorted(set(lowrank) - set(spectra))
    if missing:
        raise StoreError(f"no fitted spectrum for lowrank level(s) {missing}")
    cells = {lv: math.prod(valid_cells(image_hw, strides[lv], (1 << 30, 1 << 30))) for lv in lowrank}
    total_cells = sum(cells.values())
    cumulative = {}  # share of the level's variance kept by its top r components, r = 0..C
    for lv in lowrank:
        s = spectra[lv].double().clamp(min=0)
        cumulative[lv] = [0.0] + (s.cumsum(0) / s.sum()).tolist() if s.sum() > 0 else [1.0] * (s.numel() + 1)

    def size(dtype: str, ranks: dict[str, int]) -> int:
        layout = replace(policy, value_dtype=dtype, level_rank=dict(ranks), rank=max(ranks.values()))
        return projected_bytes(layout, strides=strides, channels=channels, importance=importance, image_hw=image_hw)[0]

    def share(ranks: dict[str, int]) -> float:
        return sum(cells[lv] * cumulative[lv][ranks[lv]] for lv in lowrank) / total_cells

    dtypes = BUDGET_DTYPES if policy.value_dtype == "auto" else (policy.value_dtype,)
    choices, smallest = [], {}
    for dtype in dtypes:
        step = 2 if dtype == "int4" else 1  # int4 packs two numbers per byte: even ranks only
        least = {lv: min(step, channels[lv]) for lv in lowrank}
        smallest[dtype] = base = size(dtype, least)
        if base > budget:
            continue
        # A record's bytes grow by a fixed amount per step of a level's rank (its coefficient map and
        # step / scale), so the best ranks are a knapsack over the bytes left, solved exactly below.
        unit = {lv: size(dtype, {**least, lv: least[lv] + step}) - base for lv in lowrank}
        gains = {
            lv: [cells[lv] * cumulative[lv][r] for r in range(least[lv], channels[lv] + 1, step)] for lv in lowrank
        }
        ranks = _best_ranks(gains, unit, budget - base)
        ranks = {lv: least[lv] + step * ranks[lv] for lv in lowrank}
        while size(dtype, ranks) > budget:  # a shape crossing a varint width adds a byte or two
            lv = max((lv for lv in lowrank if ranks[lv] > least[lv]), key=lambda lv: unit[lv])
            ranks[lv] -= step
        lost = 1.0 - QUANTISED_SHARE[dtype]
        choices.append(
            BudgetChoice(
                level_rank=ranks,
                value_dtype=dtype,
                bytes_per_view=size(dtype, ranks),
                kept=share(ranks) * (1.0 - lost),
                score=share(ranks) * (1.0 - ROUNDING_PENALTY * lost),
            )
        )
    if not choices:
        dtype = min(smallest, key=smallest.get)
        raise StoreError(
            f"a budget of {policy.budget_kb:g} KB per image-view at {image_hw[1]}x{image_hw[0]} cannot hold even the "
            f"smallest lowrank layout ({smallest[dtype] / 1024:.1f} KB: {dtype} at rank {2 if dtype == 'int4' else 1} "
            "on every level); raise --budget-kb"
        )
    return max(choices, key=lambda c: (c.score, -c.bytes_per_view))


def _best_ranks(
    gains: dict[str, list[float]], unit: dict[str, int], room: int, *, buckets: int = 1 << 16
) -> dict[str, int]:
    """Steps k_l maximising sum_l gains[l][k_l] with sum_l k_l * unit[l] <= room: dynamic programming over the
    bytes left, in buckets of ceil(room / 2^16) bytes (costs rounded up, so the answer always fits; exact
    for rooms below 64 KiB)."""
    q = max(1, -(-room // buckets))
    capacity = room // q
    best = np.zeros(capacity + 1)  # best gain with at most b buckets used, over the levels so far
    picks = {}
    for lv, gain in gains.items():
        cost = -(-unit[lv] // q) if unit[lv] > 0 else 0
        options = np.full((len(gain), capacity + 1), -np.inf)
        for k, g in enumerate(gain):
            if k * cost > capacity:
                break
            options[k, k * cost :] = best[: capacity + 1 - k * cost] + (g - gain[0])
        picks[lv] = options.argmax(0)
        best = options.max(0)
    ranks, b = {}, capacity
    for lv in reversed(list(gains)):
        k = int(picks[lv][b])
        ranks[lv] = k
        b -= k * (-(-unit[lv] // q) if unit[lv] > 0 else 0)
    return ranks


def fit_to_budget(
    policy: SelectionPolicy,
    spectra: dict[str, Tensor],
    *,
    strides: dict[str, int],
    channels: dict[str, int],
    importance: bool = False,
    where: str = "",
) -> SelectionPolicy:
    """``policy`` with the dtype and ranks ``choose_layout`` picks filled in (the budget stays recorded)."""
    choice = choose_layout(policy, spectra, strides=strides, channels=channels, importance=importance)
    log.info(
        "%s%g KB per image-view at COCO scale -> %s coefficients, ranks %s: %.1f KB, keeping %.0f %% of the fit "
        "sample's variance per cell after rounding",
        f"{where}: " if where else "",
        policy.budget_kb,
        choice.value_dtype,
        choice.level_rank,
        choice.bytes_per_view / 1024,
        100 * choice.kept,
    )
    return replace(
        policy, value_dtype=choice.value_dtype, level_rank=dict(choice.level_rank), rank=max(choice.level_rank.values())
    )
