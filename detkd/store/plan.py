"""Planning a lowrank store before building it: what each byte budget would keep of a teacher.

``plan_budgets`` runs the teacher over the views a build would fit its bases on (``fit_views``, a few
hundred, not the whole data set), measures each level's spectrum, and answers, per budget, the layout
``--budget-kb`` would choose (``detkd.store.budget``), its bytes per image-view at COCO scale and the
share of the teacher's variance it keeps per cell after rounding: disk against fidelity, before the
teacher's pass over every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from detkd.data.formats.base import DetectionSource
from detkd.data.views import View
from detkd.models.checkpoint import check_classes, load_detector
from detkd.store.budget import BudgetChoice, choose_layout
from detkd.store.build import teacher_moments
from detkd.store.format import StoreError
from detkd.store.projection import projected_bytes
from detkd.store.select import SelectionPolicy


@dataclass(frozen=True)
class BudgetPlan:
    """One budget's answer: the layout (None if not even the smallest fits, with ``reason``) and the dense
    float16 maps' bytes at the same scale."""

    budget_kb: float
    choice: BudgetChoice | None
    dense_bytes: int
    reason: str | None = None


def plan_budgets(
    *,
    teacher_checkpoint: str | Path,
    source: DetectionSource,
    views: list[View],
    canvas: int,
    budgets_kb: list[float],
    fit_views: int = 256,
    levels: list[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[BudgetPlan]:
    """Per budget (KB per image-view at COCO scale), the layout a ``--budget-kb`` build would choose."""
    teacher, payload = load_detector(teacher_checkpoint)
    teacher.eval().requires_grad_(False).to(device)
    check_classes(payload, source.class_names, path=teacher_checkpoint, role="teacher", error=StoreError)
    unknown = sorted(set(levels or ()) - set(teacher.levels))
    if unknown:
        raise StoreError(f"levels {unknown}: the teacher's levels are {teacher.levels}")
    stored = SelectionPolicy(name="lowrank", levels=levels).stored_levels(teacher.levels)
    fits = teacher_moments(teacher, source, views, canvas, fit_views, stored, batch_size, device, progress)
    spectra = {lv: fits[lv].spectrum() for lv in stored}
    layout = {
        "strides": {lv: teacher.strides[lv] for lv in stored},
        "channels": {lv: teacher.channels[lv] for lv in stored},
    }
    dense = projected_bytes(SelectionPolicy(name="lowrank"), **layout)[1]
    plans = []
    for kb in budgets_kb:
        try:
            choice = choose_layout(
                SelectionPolicy(name="lowrank", budget_kb=kb, fit_views=fit_views, levels=levels), spectra, **layout
            )
            plans.append(BudgetPlan(budget_kb=kb, choice=choice, dense_bytes=dense))
        except StoreError as exc:
            plans.append(BudgetPlan(budget_kb=kb, choice=None, dense_bytes=dense, reason=str(exc)))
    return plans


def plan_table(plans: list[BudgetPlan]) -> list[str]:
    """The plans as a markdown table (and why a budget is too small, under it)."""
    lines = [
        f"bytes per image-view at COCO scale (1333x800); dense fp16 maps {plans[0].dense_bytes / 2**20:.1f} MB",
        "| budget | coefficients | ranks | size | of dense | teacher variance kept per cell |",
        "|---|---|---|---|---|---|",
    ]
    for p in plans:
        c = p.choice
        if c is None:
            lines.append(f"| {p.budget_kb:g} KB | too small | | | | |")
            continue
        ranks = ", ".join(f"{lv} {r}" for lv, r in c.level_rank.items())
        lines.append(
            f"| {p.budget_kb:g} KB | {c.value_dtype} | {ranks} | {c.bytes_per_view / 1024:.1f} KB | "
            f"{100 * c.bytes_per_view / p.dense_bytes:.2f} % | {100 * c.kept:.0f} % |"
        )
    return lines + [f"{p.budget_kb:g} KB: {p.reason}" for p in plans if p.choice is None]
