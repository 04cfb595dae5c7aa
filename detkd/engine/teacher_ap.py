"""The weak-teacher check shared by every distillation path (online, store build, stored run).

Distilling from an untrained or wrong teacher silently wastes a run, so each path measures or
looks up the teacher's AP and warns in the same words when it is weak. Lives in ``engine`` so
the store can use it without importing ``detkd.distill``.
"""

from __future__ import annotations

import logging

import torch

from detkd.data.formats.base import DetectionSource
from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.views import ViewPolicy
from detkd.engine.inference import evaluate_detector
from detkd.models.detector import Detector

log = logging.getLogger(__name__)

WEAK_TEACHER_AP = 0.05


def warn_if_weak_teacher(
    ap: float | None,
    *,
    where: str = "",
    expected_student_ap: float | None = None,
    min_gain: float = 0.02,
) -> list[str]:
    """Log (WARNING, "!!!") and return the weak-teacher warnings for a teacher of validation AP ``ap``.

    One text for every path (online run, store build, stored run); ``where`` names the teacher
    (a checkpoint path or store directory) and where its AP comes from. ``ap`` None (not
    measured) warns nothing; NaN (a validation split without ground truth) warns.
    """
    suffix = f" ({where})" if where else ""
    messages: list[str] = []
    if ap is None:
        return messages
    if not ap >= WEAK_TEACHER_AP:
        messages.append(
            f"!!! the teacher's AP (x100) is {100 * ap:.1f}{suffix}: is it trained, and is this the right checkpoint? "
            "Distilling from it will not help the student."
        )
    if expected_student_ap is not None and not ap >= expected_student_ap + min_gain:
        messages.append(
            f"!!! teacher AP (x100) {100 * ap:.1f}{suffix} is not clearly better than the student's expected "
            f"{100 * expected_student_ap:.1f} (+{100 * min_gain:.1f}): distillation is unlikely to help"
        )
    for m in messages:
        log.warning("%s", m)
    return messages


def measure_teacher_ap(
    teacher: Detector,
    source: DetectionSource,
    policy: ViewPolicy,
    *,
    batch_size: int,
    workers: int,
    device: torch.device | str,
) -> tuple[float, float]:
    """(AP, AP50) of ``teacher`` on ``source`` (a validation split) at ``policy``'s evaluation view."""
    loader = build_loader(
        ViewedDataset(source, policy, train=False), batch_size=batch_size, shuffle=False, workers=workers
    )
    result = evaluate_detector(teacher, loader, source, device=device, progress=False)
    return result.AP, result.AP50
