"""A live teacher as a knowledge source: a frozen detector run on the student's exact batch.

Not an nn.Module of the trainable task: the teacher stays outside DDP and the optimiser.
"""

from __future__ import annotations

import torch

from detkd.data.loader import Batch
from detkd.knowledge.contract import KnowledgeOffer, TeacherKnowledge
from detkd.knowledge.importance import pseudo_targets, teacher_importance
from detkd.models.detector import Detector


class OnlineTeacher:
    """``importance_mode``: how Grad-CAM maps are built when a method needs them: the modes of
    ``importance_maps`` (``channel_mode``, ``activation_mode``) and ``targets`` = "gt" (ground truth)
    or "predictions" (the teacher's own top detections, with ``topk`` and ``score_thresh``: what
    GKD's released code does)."""

    def __init__(self, detector: Detector, *, importance_mode: dict | None = None) -> None:
        self.detector = detector.eval()
        self.detector.requires_grad_(False)
        self.levels = detector.levels
        self.strides = dict(detector.strides)
        self.channels = dict(detector.channels)
        self.importance_mode = dict(importance_mode or {})

    def to(self, device: torch.device | str) -> OnlineTeacher:
        self.detector.to(device)
        return self

    def offer(self) -> KnowledgeOffer:
        return KnowledgeOffer(levels=tuple(self.levels), importance=True, describe="the live teacher")

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge:
        self.detector.eval()  # never let a task.train() call switch BN to batch statistics
        if "importance" in needs:
            return self._with_importance(batch)
        with torch.no_grad():
            feats = self.detector.features(batch.images, batch.image_sizes)
        return TeacherKnowledge(features=dict(feats))

    def _with_importance(self, batch: Batch) -> TeacherKnowledge:
        mode = dict(self.importance_mode)
        targets_from = mode.pop("targets", "gt")
        topk, score_thresh = mode.pop("topk", 10), mode.pop("score_thresh", 0.3)
        targets = batch.targets
        if targets_from == "predictions":
            detections = self.detector.predict(batch.images, batch.image_sizes)
            targets = pseudo_targets(detections, topk=topk, score_thresh=score_thresh)
        maps = teacher_importance(self.detector, batch.images, batch.image_sizes, targets, **mode)
        return TeacherKnowledge(features=maps.features, importance=maps.spatial, channel_importance=maps.channel)
