"""Trainable tasks: one nn.Module whose forward(batch) returns named losses.

Everything trainable (student, adapters, method modules) lives inside the task, so DDP wraps
one module and a teacher stays outside it.
"""

from __future__ import annotations

from torch import Tensor, nn

from detkd.data.loader import Batch
from detkd.models.detector import Detector


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
