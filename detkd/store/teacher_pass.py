"""The teacher's pass over a batch that produces store records: forward, then the policy's selection."""

from __future__ import annotations

from dataclasses import replace

import torch

from detkd.data.loader import Batch
from detkd.knowledge import ChannelBasis
from detkd.knowledge.importance import teacher_importance
from detkd.models.detector import Detector
from detkd.store.collate import IMPORTANCE_CHANNEL, IMPORTANCE_SPATIAL
from detkd.store.format import LevelRecord
from detkd.store.select import SelectionPolicy


def teacher_selection(
    teacher: Detector,
    images: torch.Tensor,
    image_sizes: list,
    policy: SelectionPolicy,
    bases: dict[str, ChannelBasis] | None = None,
) -> list[dict[str, LevelRecord]]:
    """Teacher forward on a batch of canvases, then ``policy``'s selection: one record per image."""
    with torch.no_grad():
        raw = teacher.backbone_features(images, image_sizes)
        feats = teacher.name_features(raw)
        detections = None
        if policy.needs_detections(feats):  # from the same features
            detections = teacher.predict_from_features(raw, images, image_sizes)
    return policy.select_batch(
        feats,
        image_sizes=[tuple(size) for size in image_sizes],
        strides=teacher.strides,
        detections=detections,
        bases=bases,
    )


def select_batch(
    teacher: Detector,
    batch: Batch,
    policy: SelectionPolicy,
    importance: dict | None,
    bases: dict[str, ChannelBasis] | None = None,
):
    """Teacher forward on one batch, then per image view: (image_id, view, {level: LevelRecord})."""
    maps = None
    if importance is not None:
        maps = teacher_importance(teacher, batch.images, batch.image_sizes, batch.targets, **importance)
        records = policy.select_batch(
            maps.features,
            image_sizes=[tuple(size) for size in batch.image_sizes],
            strides=teacher.strides,
            bases=bases,
        )
    else:
        records = teacher_selection(teacher, batch.images, batch.image_sizes, policy, bases)
    for j, (image_id, view, record) in enumerate(zip(batch.image_ids, batch.views, records, strict=True)):
        if maps is not None:
            for lv, rec in record.items():
                h, w = rec.map_hw
                # Gradient channel means are tiny (they scale with the loss): fp16 would flush them to 0.
                extras = {
                    IMPORTANCE_SPATIAL: maps.spatial[lv][j, :, :h, :w].half().cpu(),
                    IMPORTANCE_CHANNEL: maps.channel[lv][j].float().cpu(),
                }
                record[lv] = replace(rec, extras=extras)
        yield image_id, view, record
