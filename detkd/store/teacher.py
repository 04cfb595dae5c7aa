"""Teacher sources backed by the store: stored knowledge, and a live teacher seen through a policy."""

from __future__ import annotations

import torch

from detkd.data.loader import Batch
from detkd.errors import ConfigError
from detkd.knowledge import KnowledgeOffer, TeacherKnowledge, level_sizes
from detkd.knowledge.online import OnlineTeacher
from detkd.models.detector import Detector
from detkd.store.codec import as_stored
from detkd.store.collate import collate_importance, collate_knowledge
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.teacher_pass import teacher_selection


class StoredTeacher:
    """Knowledge read from a store by the data loader workers; no teacher model at all."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        m = reader.manifest
        self.levels = list(m.levels)
        self.strides = dict(m.strides)
        self.channels = dict(m.channels)

    def to(self, device: torch.device | str) -> StoredTeacher:
        return self

    def offer(self) -> KnowledgeOffer:
        return self.reader.offer()

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge:
        if batch.knowledge is None:
            raise RuntimeError("batch carries no stored knowledge: the dataset has no knowledge provider")
        sizes = level_sizes(batch.images.shape[-2:], self.strides)
        knowledge = self.reader.to_knowledge(
            batch.knowledge, feature_shapes=sizes, device=batch.images.device, coefficients="coefficients" in needs
        )
        if "importance" in needs:
            knowledge.importance, knowledge.channel_importance = collate_importance(
                batch.knowledge, sizes, batch.images.device
            )
        return knowledge


class SelectingTeacher(OnlineTeacher):
    """A live teacher whose features pass through a store's selection (cells, channel pooling,
    float16 or int8) before any method sees them: exactly what a store built with ``policy`` would serve,
    without the store. A control that separates what selecting costs from what storing costs."""

    def __init__(self, detector: Detector, policy: SelectionPolicy) -> None:
        super().__init__(detector)
        if policy.needs_basis(self.levels):
            raise ConfigError(
                "online selection cannot use the lowrank selector: its bases are fitted when a store is built; "
                "build the store (detkd store build --policy lowrank) and distill from it"
            )
        unknown = sorted(set(policy.levels or ()) - set(self.levels))
        if unknown:
            raise ConfigError(f"online selection levels {unknown}: the teacher's levels are {self.levels}")
        self.policy = policy
        self.levels = policy.stored_levels(self.levels)  # what is selected is all a run can distill
        self.strides = {lv: self.strides[lv] for lv in self.levels}
        self.channels = {lv: self.channels[lv] for lv in self.levels}

    def offer(self) -> KnowledgeOffer:
        return self.policy.offer(self.levels, importance=False, describe="the live teacher selected online")

    def knowledge(self, batch: Batch, needs: frozenset[str]) -> TeacherKnowledge:
        self.detector.eval()
        records = teacher_selection(self.detector, batch.images, batch.image_sizes, self.policy)
        records = [as_stored(r, value_dtype=self.policy.value_dtype) for r in records]
        sizes = level_sizes(batch.images.shape[-2:], self.strides)
        return collate_knowledge(
            records, feature_shapes=sizes, channel_group=self.policy.channel_group, device=batch.images.device
        )
