"""From a format reader to padded batches: per-sample views, collate, DataLoader."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detkd.data.formats.base import DetectionSource
from detkd.data.sample import ImageRecord
from detkd.data.views import View, ViewPolicy, apply_view
from detkd.errors import DataError

log = logging.getLogger(__name__)

# (record, rng) -> view to replay, e.g. one of the views a knowledge store holds for that image.
ViewProvider = Callable[[ImageRecord, random.Random], View]
# (image_id, view) -> per-sample teacher knowledge read from a store (runs inside loader workers).
KnowledgeProvider = Callable[[int, View], dict]


@dataclass
class ViewedSample:
    image: Tensor  # float32 [3, h, w] in [0, 1]
    boxes: Tensor  # float32 [N, 4], view coordinates
    labels: Tensor  # int64 [N]
    image_id: int
    view: View
    orig_size: tuple[int, int]
    index: int
    knowledge: dict | None = None


@dataclass
class Batch:
    """Images on a fixed square canvas (zero padding bottom/right) plus everything about them."""

    images: Tensor  # float32 [B, 3, S, S] in [0, 1]
    image_sizes: list[tuple[int, int]]  # valid (h, w) of each image on the canvas
    targets: list[dict[str, Tensor]]  # "boxes" xyxy in view coordinates, "labels" 1..K
    image_ids: list[int]
    views: list[View]
    orig_sizes: list[tuple[int, int]]
    indices: list[int]
    knowledge: list[dict] | None = None
    skipped: int = 0  # samples of this batch dropped because their image could not be read
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Tensors moved to ``device``; ``non_blocking`` overlaps the copy with compute only from pinned memory."""
        return self._map(lambda x: x.to(device, non_blocking=non_blocking), knowledge=True)

    def pin_memory(self) -> Batch:
        """Page-locked copy of the tensors the trainer moves (images, targets, extras).

        The DataLoader's pin thread calls this (``pin_memory=True``). Stored knowledge stays as
        read: the reader collates it into new tensors on the main process before any copy.
        """
        return self._map(lambda x: x.pin_memory(), knowledge=False)

    def _map(self, fn: Callable[[Tensor], Tensor], *, knowledge: bool) -> Batch:
        def move(x):
            if isinstance(x, Tensor):
                return fn(x)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return Batch(
            images=fn(self.images),
            image_sizes=self.image_sizes,
            targets=move(self.targets),
            image_ids=self.image_ids,
            views=self.views,
            orig_sizes=self.orig_sizes,
            indices=self.indices,
            knowledge=move(self.knowledge) if knowledge and self.knowledge is not None else self.knowledge,
            skipped=self.skipped,
            extras=move(self.extras),
        )


class ViewedDataset(Dataset):
    """Applies one view per sample: drawn from (seed, epoch, index) in training, so a resumed
    run sees exactly the same views; the evaluation view otherwise; or replayed from a store."""

    def __init__(
        self,
        source: DetectionSource,
        policy: ViewPolicy,
        *,
        train: bool,
        seed: int = 0,
        view_provider: ViewProvider | None = None,
        knowledge_provider: KnowledgeProvider | None = None,
    ) -> None:
        self.source = source
        self.policy = policy
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.view_provider = view_provider
        self.knowledge_provider = knowledge_provider

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def view_for(self, index: int) -> View:
        record = self.source.records[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        if self.view_provider is not None:
            return self.view_provider(record, rng)
        return self.policy.sample(rng) if self.train else self.policy.eval_view()

    def __getitem__(self, index: int) -> ViewedSample | None:
        try:
            sample = self.source.load(index)
        except DataError as exc:
            log.warning("skipped: %s", exc)
            return None
        view = self.view_for(index)
        image, boxes = apply_view(sample.image, sample.boxes, view)
        knowledge = None
        if self.knowledge_provider is not None:
            knowledge = self.knowledge_provider(sample.image_id, view)
        return ViewedSample(
            image=image,
            boxes=boxes,
            labels=sample.labels.clone(),
            image_id=sample.image_id,
            view=view,
            orig_size=sample.orig_size,
            index=index,
            knowledge=knowledge,
        )


class Collate:
    """Pads every image top-left onto a ``canvas`` x ``canvas`` zero image."""

    def __init__(self, canvas: int) -> None:
        self.canvas = canvas

    def __call__(self, items: list[ViewedSample | None]) -> Batch:
        kept = [s for s in items if s is not None]
        images = torch.zeros((len(kept), 3, self.canvas, self.canvas), dtype=torch.float32)
        for i, s in enumerate(kept):
            h, w = s.image.shape[1:]
            if h > self.canvas or w > self.canvas:
                raise ValueError(f"view {s.view.key} gives {h}x{w}, larger than the {self.canvas}px canvas")
            images[i, :, :h, :w] = s.image
        has_knowledge = any(s.knowledge is not None for s in kept)
        return Batch(
            images=images,
            image_sizes=[tuple(s.image.shape[1:]) for s in kept],
            targets=[{"boxes": s.boxes, "labels": s.labels} for s in kept],
            image_ids=[s.image_id for s in kept],
            views=[s.view for s in kept],
            orig_sizes=[s.orig_size for s in kept],
            indices=[s.index for s in kept],
            knowledge=[s.knowledge for s in kept] if has_knowledge else None,
            skipped=len(items) - len(kept),
        )


class SeededSampler(DistributedSampler):
    """DistributedSampler whose shuffle is seeded by (seed, epoch) jointly.

    torch seeds the shuffle with ``seed + epoch``, so run seed s at epoch e + 1 would see
    exactly the order of run seed s + 1 at epoch e: "independent" seeds would share orders.
    """

    def __iter__(self):
        seed, epoch = self.seed, self.epoch
        digest = hashlib.sha256(f"{seed}/{epoch}".encode()).digest()
        self.seed, self.epoch = int.from_bytes(digest[:8], "little") >> 1, 0  # fits manual_seed
        try:
            return iter(list(super().__iter__()))  # consumed here, while the mixed seed is set
        finally:
            self.seed, self.epoch = seed, epoch


def build_loader(
    dataset: ViewedDataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): call ``set_epoch`` on both
    ``loader.sampler`` and ``loader.dataset`` at the start of every epoch.

    ``pin_memory`` (CUDA runs only): batches arrive page-locked, so ``Batch.to(cuda, non_blocking=True)``
    is a real asynchronous copy instead of a staged, synchronous one."""
    sampler = SeededSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(dataset.policy.canvas),
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
