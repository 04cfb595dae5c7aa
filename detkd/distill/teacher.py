"""Teacher sources: a live teacher model or a knowledge store, behind one interface.

``knowledge(batch, needs)`` returns TeacherKnowledge; methods never know which source
they got. Neither source is an nn.Module of the trainable task: the teacher stays outside
DDP and the optimiser.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch
from torch import Tensor

from detkd.data.loader import Batch
from detkd.distill.base import TeacherKnowledge
from detkd.models.detector import Detector


class TeacherSource(Protocol):
    levels: list[str]
    strides: dict[str, int]
    channels: dict[str, int]

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge: ...


def level_sizes(canvas, strides: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Feature map size of each level on a canvas: strided convs round up, ceil(canvas / stride)."""
    return {lvl: (-(-canvas[0] // s), -(-canvas[1] // s)) for lvl, s in strides.items()}


class OnlineTeacher:
    """A frozen detector in eval mode, run on the student's exact batch."""

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

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge:
        self.detector.eval()  # never let a task.train() call switch BN to batch statistics
        if "importance" in needs:
            return self._with_importance(batch)
        with torch.no_grad():
            feats = self.detector.features(batch.images, batch.image_sizes)
        return TeacherKnowledge(features=dict(feats))

    def _with_importance(self, batch: Batch) -> TeacherKnowledge:
        """Backpropagate the teacher's own detection loss to its FPN features (GKD), params frozen.

        ``importance_mode`` may hold, besides the Grad-CAM modes of ``importance_maps``,
        ``targets="predictions"`` (with ``topk``, ``score_thresh``): the loss is taken against the
        teacher's own top detections, as GKD's released code does, instead of the ground truth.
        """
        from detkd.distill.gkd import importance_maps

        mode = dict(self.importance_mode)
        targets = batch.targets
        if mode.pop("targets", "gt") == "predictions":
            targets = pseudo_targets(
                self.detector.predict(batch.images, batch.image_sizes),
                topk=mode.pop("topk", 10),
                score_thresh=mode.pop("score_thresh", 0.3),
            )
        mode.pop("topk", None), mode.pop("score_thresh", None)
        maps, channel = teacher_importance(
            self.detector,
            batch.images,
            batch.image_sizes,
            targets,
            importance_maps=importance_maps,
            **mode,
        )
        return TeacherKnowledge(features=maps.pop("_features"), importance=maps, channel_importance=channel)


class SelectingTeacher(OnlineTeacher):
    """A live teacher whose features pass through a store's selection (cells, channel pooling,
    float16 or int8) before any method sees them: exactly what a store built with ``policy`` would serve,
    without the store. A control that separates what selecting costs from what storing costs."""

    def __init__(self, detector: Detector, policy) -> None:
        super().__init__(detector)
        self.policy = policy

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge:
        from detkd.store.build import teacher_selection
        from detkd.store.codec import as_stored
        from detkd.store.reader import collate_knowledge

        self.detector.eval()
        records = teacher_selection(self.detector, batch.images, batch.image_sizes, self.policy)
        records = [as_stored(r, value_dtype=self.policy.value_dtype) for r in records]
        sizes = level_sizes(batch.images.shape[-2:], self.strides)
        return collate_knowledge(
            records, feature_shapes=sizes, channel_group=self.policy.channel_group, device=batch.images.device
        )


def pseudo_targets(detections: list[dict[str, Tensor]], *, topk: int, score_thresh: float) -> list[dict]:
    """The ``topk`` highest-scoring detections above ``score_thresh`` per image, as loss targets."""
    out = []
    for det in detections:
        keep = det["scores"] > score_thresh
        order = det["scores"][keep].argsort(descending=True)[:topk]
        out.append({"boxes": det["boxes"][keep][order].detach(), "labels": det["labels"][keep][order].detach()})
    return out


def teacher_importance(detector: Detector, images: Tensor, image_sizes, targets, *, importance_maps, **mode):
    """Returns ({level: importance [B,1,H,W], "_features": {level: features}}, {level: channel weights})."""
    with torch.no_grad():
        raw = detector.backbone_features(images, image_sizes)
    leaves = OrderedDict((k, v.detach().requires_grad_(True)) for k, v in raw.items())
    m = detector.model
    heads = [mod for mod in (getattr(m, "rpn", None), getattr(m, "roi_heads", None)) if mod is not None]
    # Faster R-CNN computes losses only in training mode; its RPN/RoI heads have no BN or dropout.
    for mod in heads:
        mod.train()
    try:
        with torch.enable_grad():
            losses = detector.losses_from_features(leaves, images, image_sizes, targets)
            total = sum(losses.values())
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    finally:
        for mod in heads:
            mod.eval()
    named = detector.name_features(OrderedDict((k, v.detach()) for k, v in leaves.items()))
    named_grads = detector.name_features(
        OrderedDict(
            (k, torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), grads, strict=True)
        )
    )
    spatial, channel = importance_maps(dict(named), dict(named_grads), **mode)
    out = dict(spatial)
    out["_features"] = dict(named)
    return out, channel


class StoredTeacher:
    """Knowledge read from a store by the data loader workers; no teacher model at all."""

    def __init__(self, reader) -> None:
        self.reader = reader
        m = reader.manifest
        self.levels = list(m.levels)
        self.strides = dict(m.strides)
        self.channels = dict(m.channels)

    def to(self, device: torch.device | str) -> StoredTeacher:
        return self

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge:
        if batch.knowledge is None:
            raise RuntimeError("batch carries no stored knowledge: the dataset has no knowledge provider")
        sizes = level_sizes(batch.images.shape[-2:], self.strides)
        knowledge = self.reader.to_knowledge(batch.knowledge, feature_shapes=sizes, device=batch.images.device)
        if "importance" in needs:
            knowledge.importance, knowledge.channel_importance = _stored_importance(batch, sizes)
        return knowledge


def _stored_importance(batch: Batch, sizes: dict[str, tuple[int, int]]):
    """GKD maps kept by a store built with --importance (extras "gi" [1, h, w] and "gc" [C])."""
    spatial, channel = {}, {}
    device = batch.images.device
    for lvl, (h, w) in sizes.items():
        recs = [r[lvl] for r in batch.knowledge]
        if any("gi" not in r.extras for r in recs):
            raise RuntimeError(f"store records lack importance maps for level {lvl}: build with --importance")
        out = torch.zeros(len(recs), 1, h, w, device=device)
        for i, r in enumerate(recs):
            gi = r.extras["gi"].float()
            out[i, :, : gi.shape[-2], : gi.shape[-1]] = gi.to(device)
        spatial[lvl] = out
        channel[lvl] = torch.stack([r.extras["gc"].float() for r in recs]).to(device)
    return spatial, channel
