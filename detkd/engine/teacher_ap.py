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
from detkd.engine.inference import evaluate
from detkd.models.detector import Detector

log = logging.getLogger("detkd.distill.run")  # where the online path has always logged it

WEAK_TEACHER_AP = 0.05


def warn_if_weak_teacher(
    ap: float | None,
    *,
    where: str = "",
    expected_student_ap: float | None = None,
    min_gain: float = 0.02,
) -> bool:
    """Warn loudly when ``ap`` is weak (below WEAK_TEACHER_AP, or NaN) or not clearly above the
    student's expected AP; ``where`` says where the AP comes from. Returns True if it warned."""
    if ap is None:
        return False
    suffix = f" ({where})" if where else ""
    warned = False
    if not ap >= WEAK_TEACHER_AP:  # also catches NaN (a validation split without ground truth)
        log.warning(
            "!!! the teacher's AP is %.4f%s: is it trained, and is this the right checkpoint? Distilling from "
            "it will not help the student.",
            ap,
            suffix,
        )
        warned = True
    if expected_student_ap is not None and ap < expected_student_ap + min_gain:
        log.warning(
            "!!! teacher AP %.4f%s is not clearly better than the student's expected %.4f (+%.3f): "
            "distillation is unlikely to help",
            ap,
            suffix,
            expected_student_ap,
            min_gain,
        )
        warned = True
    return warned


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
    result = evaluate(teacher, loader, source, device=device, progress=False)
    return result.AP, result.AP50
