"""Building a knowledge store: the teacher runs once over every (image, view), selection, writing.

The teacher sees exactly what it would see during online distillation: the same replayable
view, the same fixed canvas and the same Collate, so a stored record equals the teacher's
features for that view at training time (up to fp16). Building is restartable (records that
are already committed are skipped) and can be split into shards, one process each.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detkd.data.formats.base import DetectionSource
from detkd.data.loader import Collate, ViewedDataset
from detkd.data.views import View
from detkd.models.checkpoint import file_sha256, load_detector
from detkd.store.format import LevelRecord, Manifest, StoreError
from detkd.store.select import SelectionPolicy
from detkd.store.writer import StoreWriter, shard_indices

log = logging.getLogger(__name__)

BUILD_INFO = "build_info.json"


class _PairDataset(Dataset):
    """(image index, view) pairs through the training pipeline with the view forced."""

    def __init__(self, source: DetectionSource, pairs: list[tuple[int, View]]) -> None:
        self.pairs = pairs
        self.inner = ViewedDataset(source, policy=None, train=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        index, view = self.pairs[i]
        self.inner.view_provider = lambda record, rng, v=view: v
        return self.inner[index]


def preprocessing_of(detector, *, canvas: int) -> dict:
    """What must match between a store and a run for stored features to be the teacher's features."""
    return {
        "canvas": int(canvas),
        "resize": "longer-side, bilinear antialias, top-left on a zero canvas",
        "image_mean": [round(float(v), 6) for v in detector.spec["image_mean"]],
        "image_std": [round(float(v), 6) for v in detector.spec["image_std"]],
    }


def build_store(
    *,
    teacher_checkpoint: str | Path,
    source: DetectionSource,
    policy: SelectionPolicy,
    views: list[View],
    canvas: int,
    out_dir: str | Path,
    batch_size: int = 8,
    workers: int = 0,
    shard: int | None = None,
    num_shards: int | None = None,
    with_importance: bool = False,
    mirror_flips: bool = False,
    progress: bool = True,
    teacher_ap: float | None = None,
    device: str | torch.device = "cpu",
) -> Manifest:
    out_dir = Path(out_dir)
    teacher, _ = load_detector(teacher_checkpoint)
    teacher.eval().requires_grad_(False).to(device)
    if with_importance and any(policy.mode_for(lv) != "dense" for lv in teacher.levels):
        raise StoreError("--importance (stored GKD) needs the dense policy: GKD imitates whole maps")
    stored_views = [v for v in views if not (mirror_flips and v.flip)]
    shapes = {lv: [-(-canvas // s), -(-canvas // s)] for lv, s in teacher.strides.items()}
    manifest = Manifest(
        teacher_hash=file_sha256(teacher_checkpoint),
        architecture=dict(teacher.spec),
        preprocessing={
            **preprocessing_of(teacher, canvas=canvas),
            "mirror_flips": bool(mirror_flips),
            "importance": bool(with_importance),
        },
        levels=list(teacher.levels),
        strides=dict(teacher.strides),
        channels=dict(teacher.channels),
        feature_shapes=shapes,
        policy=policy.to_dict(),
        views=[v.to_dict() for v in views],
        dataset_fingerprint=source.fingerprint(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    indices = range(len(source)) if shard is None else shard_indices(len(source), shard=shard, num_shards=num_shards)
    writer = StoreWriter(out_dir, manifest, shard=shard, num_shards=num_shards)
    try:
        todo = [(i, v) for i in indices for v in stored_views if not writer.has(source.records[i].image_id, v)]
        done_before = len(indices) * len(stored_views) - len(todo)
        if done_before:
            log.info("%s: %d records already built, %d to go", out_dir, done_before, len(todo))
        t0 = time.perf_counter()
        loader = DataLoader(
            _PairDataset(source, todo),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=Collate(canvas),
        )
        bar = tqdm(total=len(todo), desc="store build", unit="view", disable=not progress, dynamic_ncols=True)
        for batch in loader:
            if len(batch):
                batch = batch.to(device)
                for image_id, view, record in _select_batch(teacher, batch, policy, with_importance):
                    writer.write(image_id, view, record)
            bar.update(len(batch) + batch.skipped)
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        writer.close()
    info = {
        "teacher_checkpoint": str(teacher_checkpoint),
        "teacher_ap": teacher_ap,
        "seconds": seconds,
        "image_views_per_second": len(todo) / max(seconds, 1e-9),
        "built_now": len(todo),
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2))
    return Manifest.load(out_dir)


def _select_batch(teacher, batch, policy: SelectionPolicy, with_importance: bool):
    importance = channel = None
    if with_importance:
        from detkd.distill.gkd import importance_maps
        from detkd.distill.teacher import teacher_importance

        maps, channel = teacher_importance(
            teacher, batch.images, batch.image_sizes, batch.targets, importance_maps=importance_maps
        )
        feats = maps.pop("_features")
        importance = maps
    else:
        with torch.no_grad():
            raw = teacher.backbone_features(batch.images, batch.image_sizes)
            feats = teacher.name_features(raw)
    detections = None
    if any(policy.mode_for(lv) == "detections" for lv in feats):
        with torch.no_grad():
            raw = teacher.backbone_features(batch.images, batch.image_sizes)
            detections = teacher.predict_from_features(raw, batch.images, batch.image_sizes)
    for j, (image_id, view, size) in enumerate(zip(batch.image_ids, batch.views, batch.image_sizes, strict=True)):
        per_image = {lv: f[j].float().cpu() for lv, f in feats.items()}
        dets = None if detections is None else {k: v.cpu() for k, v in detections[j].items()}
        record = policy.select_image(per_image, image_size=size, strides=teacher.strides, detections=dets)
        if importance is not None:
            for lv, rec in record.items():
                h, w = rec.dense.shape[-2:]
                extras = {"gi": importance[lv][j, :, :h, :w].half().cpu(), "gc": channel[lv][j].half().cpu()}
                record[lv] = LevelRecord(dense=rec.dense, extras=extras)
        yield image_id, view, record


def read_build_info(store_dir: str | Path) -> dict:
    path = Path(store_dir) / BUILD_INFO
    return json.loads(path.read_text()) if path.is_file() else {}
