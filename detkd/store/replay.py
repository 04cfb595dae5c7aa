"""Training from a store: compatibility checks, replay of stored views, knowledge for the loader."""

from __future__ import annotations

import random
from dataclasses import dataclass

from detkd.data.formats.base import DetectionSource
from detkd.data.sample import Record
from detkd.data.views import View, ViewPolicy
from detkd.errors import ConfigError
from detkd.store.format import StoreError
from detkd.store.reader import StoreReader, mirror_levels


def check_store_for_run(reader: StoreReader, *, source: DetectionSource, policy: ViewPolicy) -> None:
    """Refuse a store whose data or preprocessing differ from the run, naming the field."""
    m = reader.manifest
    if m.dataset_fingerprint != source.fingerprint():
        raise StoreError(
            f"{reader.path}: dataset_fingerprint differs: the store was built on other data (or another split, "
            "or a changed annotation file); rebuild it with `detkd store build` on this training split"
        )
    canvas = m.preprocessing.get("canvas")
    if canvas != policy.canvas:
        raise StoreError(
            f"{reader.path}: preprocessing.canvas differs: store {canvas}px, run {policy.canvas}px "
            f"(data.sizes={list(policy.sizes)}); set data.sizes to the store's scale or rebuild the store"
        )
    stored_sizes = {View.from_dict(v).size for v in m.views}
    if not set(policy.sizes) <= stored_sizes:
        raise StoreError(
            f"{reader.path}: views: the store holds sizes {sorted(stored_sizes)}, the run draws {list(policy.sizes)}"
        )


def check_methods(reader: StoreReader, methods: dict) -> None:
    """Before training: every method must be able to consume this store's policy."""
    m = reader.manifest
    sparse = [lv for lv in m.levels if reader.policy.mode_for(lv) != "dense"]
    for name, method in methods.items():
        if sparse and not method.sparse_ok:
            raise ConfigError(
                f"method {name!r} needs whole teacher feature maps but the store keeps sparse cells on levels "
                f"{sparse} (policy {reader.policy.name!r}); use a position-wise method (fitnet, pkd), or build a "
                "store with --policy dense, or distill online"
            )
        if "importance" in method.needs and not m.preprocessing.get("importance"):
            raise ConfigError(
                f"method {name!r} needs the teacher's gradient-importance maps; build the store with "
                "--importance (and --policy dense)"
            )


@dataclass
class StoredViews:
    """Picklable view provider: one of the image's stored views, drawn FKD style."""

    reader: StoreReader
    mirror_flips: bool

    def __call__(self, record: Record, rng: random.Random) -> View:
        views = self.reader.views_for(record.image_id)
        if not views:
            raise StoreError(f"{self.reader.path}: no stored view for image {record.image_id} ({record.file})")
        if self.mirror_flips:
            views = sorted(set(views) | {View(size=v.size, flip=True) for v in views})
        return views[rng.randrange(len(views))]


@dataclass
class StoredKnowledge:
    """Picklable knowledge provider run in loader workers; mirrors unflipped records when asked."""

    reader: StoreReader
    mirror_flips: bool
    sizes: dict[int, tuple[int, int]]  # image id -> original (h, w), to find a view's valid width

    def __call__(self, image_id: int, view: View) -> dict:
        if self.mirror_flips and view.flip:
            base = View(size=view.size, flip=False)
            record = self.reader.read(image_id, base)
            size = view.output_size(*self.sizes[image_id])
            return mirror_levels(record, image_size=size, strides=self.reader.manifest.strides)
        return self.reader.read(image_id, view)


def providers(reader: StoreReader, source: DetectionSource) -> tuple[StoredViews, StoredKnowledge]:
    mirror = bool(reader.manifest.preprocessing.get("mirror_flips"))
    sizes = {r.image_id: (r.height, r.width) for r in source.records}
    return StoredViews(reader, mirror), StoredKnowledge(reader, mirror, sizes)
