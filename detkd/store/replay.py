"""Training from a store: compatibility checks, replay of stored views, knowledge for the loader."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from detkd.data.formats.base import DetectionSource
from detkd.data.sample import ImageRecord
from detkd.data.views import View, ViewPolicy
from detkd.models.detector import Detector
from detkd.store.build import RESIZE_RULE
from detkd.store.content import check_content
from detkd.store.format import LevelRecord, StoreError
from detkd.store.mirror import mirror_levels
from detkd.store.reader import StoreReader

log = logging.getLogger(__name__)


def check_store_for_run(
    reader: StoreReader,
    *,
    source: DetectionSource,
    policy: ViewPolicy,
    student: Detector | None = None,
    levels: list[str] | None = None,
) -> None:
    """Refuse a store that does not match the run, naming every differing field and what to change.

    Checked: the data set (fingerprint of the training split, then the images' content against the
    store's digests, ``content.check_content``), the preprocessing (canvas, resize rule, view sizes)
    and, given the ``student``, the levels it distills (``levels``; default all of the student's, or of a
    store built with ``--levels`` the stored ones among them) against the stored levels and strides.
    """
    m = reader.manifest
    pre = m.preprocessing
    problems: list[str] = []
    if m.dataset_fingerprint != source.fingerprint():
        problems.append(
            "dataset_fingerprint differs: the store was built on other data (another split, or a changed "
            "annotation file); point data.root/data.train_split at the data it was built on, or rebuild it "
            "with `detkd store build` on this training split"
        )
    if pre.get("canvas") != policy.canvas:
        problems.append(
            f"preprocessing.canvas differs: store {pre.get('canvas')}px, run {policy.canvas}px "
            f"(data.sizes={list(policy.sizes)}); set data.sizes to the store's {pre.get('sizes')} or rebuild "
            "the store with --size"
        )
    if pre.get("resize", RESIZE_RULE) != RESIZE_RULE:
        problems.append(
            f"preprocessing.resize differs: store {pre.get('resize')!r}, this detkd {RESIZE_RULE!r}; rebuild the store"
        )
    stored_sizes = sorted({View.from_dict(v).size for v in m.views})
    if not set(policy.sizes) <= set(stored_sizes):
        problems.append(
            f"views: the store holds sizes {stored_sizes}, the run draws {list(policy.sizes)}; set data.sizes "
            f"to {stored_sizes} or rebuild the store with --size {' '.join(map(str, policy.sizes))}"
        )
    if student is not None:
        chosen = (m.policy or {}).get("levels")  # a store of some levels serves those by default
        wanted = list(levels) if levels is not None else [lv for lv in student.levels if not chosen or lv in chosen]
        missing = [lv for lv in wanted if lv not in m.levels]
        if missing:
            shared = [lv for lv in wanted if lv in m.levels]
            where = "distill.levels" if levels is not None else f"the student's levels {student.levels}"
            problems.append(
                f"levels: the store holds {m.levels}, {where} include {missing}; set distill.levels="
                f"[{','.join(shared)}] to distill the stored ones, or rebuild the store from a teacher with {missing}"
            )
        bad = [lv for lv in wanted if lv in m.levels and lv in student.strides and student.strides[lv] != m.strides[lv]]
        if bad:
            detail = ", ".join(f"{lv}: store {m.strides[lv]}, student {student.strides[lv]}" for lv in bad)
            problems.append(f"strides differ ({detail}); exclude those levels with distill.levels or rebuild")
    if problems:
        raise StoreError(f"{reader.path} does not match this run:\n  " + "\n  ".join(problems))
    check_content(reader.path, source)  # the annotations match; are the pixels the ones it was built on?


def without_unstored(reader: StoreReader, source: DetectionSource, policy: ViewPolicy) -> tuple[DetectionSource, int]:
    """The training split less the images the build skipped that have no stored view this run can use.

    A store build skips unreadable images and records them (``Manifest.gaps``). A run from such a
    store leaves those images out, with a counted warning, rather than failing mid-epoch when the
    loader asks the store for them; images with at least one usable stored view stay in. Returns
    (source, number left out); ``source`` itself when nothing is left out.
    """
    gap_ids = {int(g["image_id"]) for g in reader.gaps}
    if not gap_ids:
        return source, 0
    views = StoredViews(
        reader, bool(reader.manifest.preprocessing.get("mirror_flips")), tuple(policy.sizes), policy.flip_prob > 0
    )
    unusable = set()
    for r in source.records:
        if r.image_id in gap_ids:
            try:
                views(r, random.Random(0))
            except StoreError:
                unusable.add(r.image_id)
    if not unusable:
        return source, 0
    shown = ", ".join(str(i) for i in sorted(unusable)[:10]) + (" ..." if len(unusable) > 10 else "")
    log.warning(
        "%s: %d training image(s) have no stored view (the build skipped them: see `detkd store info`); "
        "left out of this run: image id(s) %s",
        reader.path,
        len(unusable),
        shown,
    )
    kept = [r for r in source.records if r.image_id not in unusable]
    return DetectionSource(kept, source.class_names, source.problems), len(unusable)


@dataclass
class StoredViews:
    """Picklable view provider: one of the image's stored views, drawn FKD style from the loader's rng."""

    reader: StoreReader
    mirror_flips: bool
    sizes: tuple[int, ...] | None = None  # the run's data.sizes: replay only these scales (None: all)
    flips: bool = True  # False when the run disables flipping (data.flip_prob=0)
    # image id -> its servable views; a finished store does not change, and each epoch asks again
    _cache: dict[int, list[View]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, record: ImageRecord, rng: random.Random) -> View:
        views = self._cache.get(record.image_id)
        if views is None:
            views = self._cache[record.image_id] = self._servable(record.image_id)
        if not views:
            raise StoreError(
                f"{self.reader.path}: no stored view of image {record.image_id} ({record.file}) fits this run "
                f"(sizes {self.sizes}, flips {'on' if self.flips else 'off'}); did its build finish? rerun "
                "`detkd store build` to complete it"
            )
        return views[rng.randrange(len(views))]

    def _servable(self, image_id: int) -> list[View]:
        views = self.reader.views_for(image_id)
        if self.mirror_flips:  # the manifest's flipped views are served by mirroring their unflipped record
            listed = {View.from_dict(v) for v in self.reader.manifest.views}
            views = sorted(set(views) | ({View(size=v.size, flip=True) for v in views} & listed))
        return [v for v in views if (self.sizes is None or v.size in self.sizes) and (self.flips or not v.flip)]


@dataclass
class StoredKnowledge:
    """Picklable knowledge provider run in loader workers; mirrors unflipped records when asked."""

    reader: StoreReader
    mirror_flips: bool
    sizes: dict[int, tuple[int, int]]  # image id -> original (h, w), to find a view's valid width

    def __call__(self, image_id: int, view: View) -> dict[str, LevelRecord]:
        if self.mirror_flips and view.flip:
            record = self.reader.read(image_id, View(size=view.size, flip=False))
            size = view.output_size(*self.sizes[image_id])
            return mirror_levels(record, image_size=size, strides=self.reader.manifest.strides)
        return self.reader.read(image_id, view)


def providers(
    reader: StoreReader, source: DetectionSource, policy: ViewPolicy | None = None
) -> tuple[StoredViews, StoredKnowledge]:
    """(view provider, knowledge provider) for a ViewedDataset that trains from ``reader``; with the run's
    view ``policy`` only its scales are replayed, and flips only if it flips at all."""
    mirror = bool(reader.manifest.preprocessing.get("mirror_flips"))
    sizes = {r.image_id: (r.height, r.width) for r in source.records}
    views = StoredViews(reader, mirror)
    if policy is not None:
        views = StoredViews(reader, mirror, sizes=tuple(policy.sizes), flips=policy.flip_prob > 0)
    return views, StoredKnowledge(reader, mirror, sizes)
