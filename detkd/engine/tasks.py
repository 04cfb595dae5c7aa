"""Trainable tasks: one nn.Module whose forward(batch) returns named losses.

Everything trainable (student, adapters, method modules) lives inside the task, so DDP wraps
one module and a teacher stays outside it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from detkd.data.loader import Batch
from detkd.models.detector import Detector


@runtime_checkable
class TrainingTask(Protocol):
    """What the Trainer drives. An nn.Module in practice (the Trainer moves it, wraps it in DDP and
    optimises its parameters); ``weight_report`` is optional (distillation tasks report their loss weights)."""

    student: Detector

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """Named losses of one batch; their sum is what is minimised."""
        ...

    def extra_state(self) -> dict:
        """State beyond the student's weights that a resumed run needs, e.g. adapters and frozen weights."""
        ...

    def load_extra_state(self, state: dict) -> None: ...


class DetectionTask(nn.Module):
    """Plain detector training: the detection losses only."""

    def __init__(self, student: Detector) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.student(batch.images, batch.image_sizes, batch.targets)

    def extra_state(self) -> dict:
        """State beyond the student's weights that a resumed run needs (none here)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        del state
