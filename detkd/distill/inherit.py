"""'Inheriting' initialisation: copy the teacher's neck and heads into the student.

FGD and GKD's released code copy every teacher weight outside the backbone body before
training, and much of their published gain depends on it, so detkd makes it explicit and
records it in every result.
"""

from __future__ import annotations

import logging

import torch

from detkd.models.detector import Detector

log = logging.getLogger(__name__)


def inherit_neck_and_heads(student: Detector, teacher: Detector) -> dict[str, int]:
    """Copy tensors whose names match, that are not in the backbone body, and whose shapes agree.

    Returns counts: copied, skipped for a shape mismatch, and not present in the teacher.
    """
    t_state = teacher.model.state_dict()
    s_state = student.model.state_dict()
    copied = mismatched = absent = 0
    with torch.no_grad():
        for name, tensor in s_state.items():
            if name.startswith("backbone.body."):
                continue
            if name not in t_state:
                absent += 1
            elif t_state[name].shape != tensor.shape:
                mismatched += 1
            else:
                tensor.copy_(t_state[name])
                copied += 1
    log.info(
        "inherited %d teacher tensors (neck and heads); %d shape mismatches, %d absent", copied, mismatched, absent
    )
    return {"copied": copied, "shape_mismatch": mismatched, "absent": absent}
